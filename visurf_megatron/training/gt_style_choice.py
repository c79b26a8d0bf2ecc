"""``algorithm.gt_style: auto``: render the GT the way the current policy is most likely to write it.

VISURF.md, reward control 1: the style "can be chosen by measuring which style has the higher
teacher-forced log-prob under the current policy". For a batch of prompts, every candidate style's GT
rows are teacher forced through the model (forward only, temperature 1) and each style scores the mean
over prompts of the GT row's total log-prob, sum_t log pi(y*_t | x, y*_<t) over the response tokens
(the end-of-turn token included). A total, not a per-token mean: a style that spends more tokens on
the same answer is less likely as a whole, and that is what the rollouts reflect.

Collective: every rank of the world calls it with its own data-parallel share of prompts; the sums
are reduced over the world, so every rank returns the same scores and picks the same style.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from visurf_megatron.data.gt_style import gt_style_names

from . import experience
from .batching import padded_length
from .forward import run_micro_batches
from .packing import build_micro_batches

AUTO = "auto"


def candidate_styles(styles: Sequence[str] | None = None) -> list[str]:
    """The styles ``auto`` chooses among (default: every registered style, in registry order)."""
    return gt_style_names(styles or None)


def score_gt_styles(model_chunks, prompts, styles: Sequence[str], *, tokenizer, end_of_turn_id: int,
                    image_token_id: int, pad_id: int, spatial_merge_size: int, micro_batch_size: int,
                    seq_multiple: int = 1, max_tokens: int | None = None) -> dict[str, float]:
    """Mean teacher-forced total log-prob of the GT rendered in each style (see the module doc).

    ``max_tokens``: pack the rows into streams of that many tokens (``packing``), as the update does."""
    rows_by_style = {s: experience.build_rows(prompts, None, with_gt=True, gt_style=s, tokenizer=tokenizer,
                                              end_of_turn_id=end_of_turn_id) for s in styles}
    length = padded_length([r for rows in rows_by_style.values() for r in rows], prompts, seq_multiple)
    counts = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0)  # each replica's rows once
    totals = torch.zeros(2, len(styles), dtype=torch.float64)

    def row_logp(mb, logp, entropy):
        return logp.sum() * 0, {"logp": (logp.detach().double() * mb.loss_mask.double()).sum(-1)}

    for k, style in enumerate(styles):
        rows = rows_by_style[style]
        # Forward only: no data-parallel collective depends on the micro-batch count here.
        micro = build_micro_batches(rows, range(len(rows)), prompts, image_token_id=image_token_id, pad_id=pad_id,
                                    spatial_merge_size=spatial_merge_size, micro_batch_size=micro_batch_size,
                                    max_tokens=max_tokens, multiple=seq_multiple, row_width=length)
        with torch.no_grad():
            outputs = run_micro_batches(model_chunks, micro, row_logp, forward_only=True, temperature=1.0)
        if counts:
            for mb, out in zip(micro, outputs):
                real = mb.row_index >= 0
                totals[0, k] += out["logp"].cpu()[real].sum()
                totals[1, k] += int(real.sum())
    dist.all_reduce(totals)
    return {style: float(totals[0, k] / totals[1, k]) if totals[1, k] > 0 else float("nan")
            for k, style in enumerate(styles)}
