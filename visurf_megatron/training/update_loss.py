"""The loss one update micro-batch contributes, as megatron's schedule calls it on the last stage.

Everything the loss reads travels with the micro-batch (``MicroBatch.rows``: the rows' ``RowInfo``;
``MicroBatch.old_logp``), so ``run_micro_batches`` moves it all to the model's device in one place.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from .batching import MicroBatch


def attach_rows(micro_batches, info, old_logp: Optional[Mapping[int, torch.Tensor]] = None) -> None:
    """Give each micro-batch its rows' ``RowInfo`` (padding rows read row 0; their loss mask is 0)
    and, when the update has old log-probs (row -> [S]), their [B, S] stack (zeros for padding)."""
    filler = next(iter(old_logp.values())) if old_logp else None
    for mb in micro_batches:
        mb.rows = info.select(mb.row_index.clamp(min=0))
        if filler is not None:
            mb.old_logp = torch.stack([old_logp[r] if r in old_logp else torch.zeros_like(filler)
                                       for r in mb.row_index.tolist()])


def update_loss_fn(paradigm, norms: Mapping[str, torch.Tensor], *, step: int, scale: float,
                   entropy_coef: float) -> Callable:
    """``loss_fn(mb, logp, entropy) -> (loss * scale, outputs)`` for ``forward.run_micro_batches``.

    Without ``mb.old_logp`` (one update per batch) the current log-probs, detached, are the old
    ones: ratio 1. ``scale`` undoes megatron's division by the number of micro-batches and DDP's
    mean over DP ranks (the loss is already normalised globally through ``norms``). The entropy
    reaches the loss only when ``entropy_coef`` is non-zero; it is returned (detached) either way,
    for the metric. Outputs stay tensors on the model's device: reading them as numbers here would
    make the host wait on the device once per metric and micro-batch; the trainer reads them after
    the schedule.
    """

    def loss_fn(mb: MicroBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor]):
        if mb.rows is None:
            raise ValueError("update micro-batch without row info: call attach_rows first")
        old = logp.detach()
        if mb.old_logp is not None:
            old = torch.where(mb.real_rows.unsqueeze(-1), mb.old_logp, old)
        loss, metrics = paradigm.loss(logp, old, mb.loss_mask, mb.rows, step,
                                      entropy=entropy if entropy_coef else None, norms=norms)
        out = {"loss": loss.detach(), "logp": logp.detach(),
               "entropy": entropy.detach() if entropy is not None else None,
               "metrics": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        return loss * scale, out

    return loss_fn
