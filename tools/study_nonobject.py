#!/usr/bin/env python
"""placeholder (being written)"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Evaluation inside the training world (no conversion: the rollout engine already holds the weights)


def strict_grounding_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """The study's metrics: a no-target sample counts as answered correctly only for a well-formed
    empty answer (``<answer>[]</answer>`` that parses, no object dropped as invalid). The library's
    default counts an unparseable answer as an empty prediction (the authors' convention), which
    would credit a model that outputs garbage with N-Acc = 1; those numbers are kept as ``lib_*``.
    """
    from visurf_megatron.eval.scoring import metrics_from_records

    n = n_target = n_none = n_none_ok = bbox_ok = target_pred = 0
    sum_iou = 0.0
    inter = union = 0
    for r in records:
        st = r["stats"]
        n += 1
        inter += st["inter"]
        union += st["union"]
        if st["no_target"]:
            n_none += 1
            ok = r.get("parse_error") is None and not r.get("objects") and not r.get("n_invalid_objects")
            n_none_ok += int(ok)
            sum_iou += float(ok)
            bbox_ok += int(ok)
        else:
            n_target += 1
            sum_iou += st["iou"]
            bbox_ok += int(st["bbox_hit"])
            target_pred += int(not st["pred_empty"])

    def ratio(a, b):
        return a / b if b else None

    out = {"giou": ratio(sum_iou, n), "ciou": ratio(inter, union), "n_acc": ratio(n_none_ok, n_none),
           "t_acc": ratio(target_pred, n_target), "bbox_acc": ratio(bbox_ok, n),
           "parse_fail_rate": ratio(sum(r.get("parse_error") is not None for r in records), n),
           "count": n, "no_target_count": n_none}
    lib = metrics_from_records(records, "grounding")
    out.update({f"lib_{k}": v for k, v in lib.items() if k != "count"})
    return out


def evaluate_trainer(trainer, val_path: str, *, image_size: int, max_new_tokens: int,
                     predictions_path: Optional[str] = None, limit: Optional[int] = None) -> Optional[dict]:
    """Greedy evaluation of the trainer's current weights on ``val_path`` (collective: every rank
    calls it). The weights go into the rollout engine (``sync_weights``); each data-parallel replica
    answers its share of the samples and rank 0 gathers the records and returns the metrics (other
    ranks return None). Prompts, parsing, coordinate mapping and masks (box masks) are the
    evaluation library's (``eval/runner.build_request``, ``eval/scoring.score_sample``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from visurf_megatron.eval.datasets import load_eval_items
    from visurf_megatron.eval.runner import build_request
    from visurf_megatron.eval.scoring import score_sample
    from visurf_megatron.eval.segmenter import build_segmenter
    from visurf_megatron.rollout.base import SamplingConfig

    cfg = trainer.cfg
    items = load_eval_items(val_path, task="grounding")
    if limit:
        items = items[:limit]
    trainer.sync_weights()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    records = []
    if trainer.engine is not None:
        segmenter = build_segmenter("box")
        sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        mine = items[dp_rank::dp_size]
        built = [build_request(it.sample, trainer.processor, image_size=image_size,
                               prompt_style=cfg.data.prompt_style, think=cfg.data.think) for it in mine]
        completions = trainer.engine.generate([r for r, _ in built], sampling) if built else []
        for it, (request, stored), group in zip(mine, built, completions):
            c = group[0]
            rec, _ = score_sample(it, c.text, image=stored, image_size=image_size, segmenter=segmenter)
            records.append({"id": it.id, "index": it.index, "query": it.sample.problem, "response": c.text,
                            "finish_reason": c.finish_reason, **rec})
        trainer.engine.sleep()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() != 0:
        return None
    by_id = {}
    for part in gathered:
        for r in part:
            by_id.setdefault(r["id"], r)
    records = sorted(by_id.values(), key=lambda r: r["index"])
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return strict_grounding_metrics(records)
