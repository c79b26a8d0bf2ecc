"""The training batch as the paradigms see it: one scalar description per row (``RowBatch``), what
each row is trained with (``RowInfo``), and DAPO-style dynamic sampling (``filter_groups``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

__all__ = ["RowBatch", "RowInfo", "filter_groups", "row_info", "rows_mask"]


# --------------------------------------------------------------------------------------------
# batch description
# --------------------------------------------------------------------------------------------
@dataclass
class RowBatch:
    """One scalar description per row of the training batch ([N] each).

    rewards          full reward of each row (GT rows: R_gt, thinking-format term already 0)
    group_index      prompt id per row; arbitrary integers
    is_gt            True on the ground-truth / external answer row (at most one per group)
    correct          optional bool per row: is this rollout correct (HPT); default derived from
                     ``compare_rewards`` (or ``rewards``) >= the paradigm's threshold
    compare_rewards  optional float per row: what ViSurf smoothing / HPT correctness compare
                     (e.g. the accuracy term only); default ``rewards``
    """

    rewards: Tensor
    group_index: Tensor
    is_gt: Tensor
    correct: Optional[Tensor] = None
    compare_rewards: Optional[Tensor] = None

    def __post_init__(self) -> None:
        n = self.rewards.shape[0]
        for name in ("rewards", "group_index", "is_gt", "correct", "compare_rewards"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or t.shape[0] != n):
                raise ValueError(f"RowBatch.{name} must have shape [{n}], got {tuple(t.shape)}")
        self.is_gt = self.is_gt.to(torch.bool)
        if self.correct is not None:
            self.correct = self.correct.to(torch.bool)

    @property
    def num_rows(self) -> int:
        return self.rewards.shape[0]

    def select(self, idx: Union[Tensor, slice]) -> "RowBatch":
        def pick(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[idx]

        return RowBatch(
            pick(self.rewards), pick(self.group_index), pick(self.is_gt),
            pick(self.correct), pick(self.compare_rewards),
        )


@dataclass
class RowInfo:
    """What each row is trained with ([N] each), produced by ``Paradigm.compute_row_info``.

    advantages   float32, used by ``pg_rows`` and ``shaped_rows`` (0 elsewhere)
    pg_rows      clipped PPO surrogate  -min(rho A, clip(rho) A)
    shaped_rows  LUFFY surrogate        -A p/(p+gamma), no clip, no old log-prob
    sft_rows     NLL                    -logp
    metrics      per-batch scalars for logging (e.g. fraction of groups smoothed)
    extras       anything else a paradigm wants to keep (e.g. ViSurf's VisurfStats)
    """

    advantages: Tensor
    pg_rows: Tensor
    sft_rows: Tensor
    shaped_rows: Tensor
    metrics: Dict[str, Tensor] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def active_rows(self) -> Tensor:
        return self.pg_rows | self.sft_rows | self.shaped_rows

    def select(self, idx: Union[Tensor, slice]) -> "RowInfo":
        """Rows ``idx`` (a micro-batch); metrics and extras stay whole-batch."""
        return replace(
            self,
            advantages=self.advantages[idx],
            pg_rows=self.pg_rows[idx],
            sft_rows=self.sft_rows[idx],
            shaped_rows=self.shaped_rows[idx],
        )


def row_info(rows: RowBatch, adv=None, *, pg=None, sft=None, shaped=None, **kw) -> RowInfo:
    none = torch.zeros_like(rows.is_gt)
    return RowInfo(
        advantages=(torch.zeros_like(rows.rewards, dtype=torch.float32) if adv is None else adv.float()),
        pg_rows=none if pg is None else pg,
        sft_rows=none if sft is None else sft,
        shaped_rows=none if shaped is None else shaped,
        **kw,
    )


def rows_mask(mask: Tensor, rows: Tensor) -> Tensor:
    """Token mask restricted to the selected rows."""
    return mask * rows.to(mask.dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# DAPO-style dynamic sampling
# --------------------------------------------------------------------------------------------
def filter_groups(
    rewards: Tensor, group_index: Tensor, is_gt: Optional[Tensor] = None, *, atol: float = 0.0
) -> Tensor:
    """keep_mask [N]: False on every row (GT row included) of a group whose rollout rewards are all
    equal (max - min <= atol), or which has no rollout.

    Only rollout rewards are judged: a GT row would otherwise make almost every group look
    informative. Note that under ViSurf this drops all-wrong groups, where the GT row carries the
    whole learning signal; use it there deliberately.
    """
    is_gt = torch.zeros_like(rewards, dtype=torch.bool) if is_gt is None else is_gt.to(torch.bool)
    r = rewards.detach().to(torch.float64)
    ids, inv = torch.unique(group_index, return_inverse=True)
    k = ids.shape[0]
    inf = torch.full((k,), float("inf"), dtype=r.dtype, device=r.device)
    roll = ~is_gt
    hi = (-inf).scatter_reduce(0, inv, torch.where(roll, r, -torch.ones_like(r) * float("inf")), "amax")
    lo = inf.scatter_reduce(0, inv, torch.where(roll, r, torch.ones_like(r) * float("inf")), "amin")
    n_roll = torch.zeros(k, dtype=torch.long, device=r.device).index_add_(0, inv, roll.long())
    informative = (n_roll > 0) & (hi - lo > atol)
    return informative[inv]
