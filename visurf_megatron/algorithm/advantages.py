"""Outcome advantages for group-sampled policy optimisation (GRPO, Dr.GRPO, ViSurf).

Every estimator works on one scalar reward per sequence (row) and a group id per row; rows of one
group are the responses to one prompt. Group ids are arbitrary integers (not necessarily contiguous
or sorted) and groups may have different sizes. All statistics are computed with scatter/index_add
over ``torch.unique(..., return_inverse=True)`` ids, so there is no Python loop over groups.

ViSurf (see ``shared/VISURF.md``) adds the ground-truth answer y* as member G+1 of its group:

    R   = [r_1 .. r_G, r_gt]
    A_j = (R_j - mean(R)) / (std(R) + eps)          (Eq. 6 rollouts, Eq. 7 GT)

with reward smoothing (control 3): if max_i c_i >= c_gt then r_gt := mean(r_1 .. r_G), where c is
the comparison reward (the total reward by default, or e.g. the accuracy term only).

Registered estimators share one signature::

    fn(rewards, group_index, is_gt=None, **kw) -> advantages [N]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = [
    "GroupStats",
    "VisurfStats",
    "group_stats",
    "grpo_advantages",
    "visurf_advantages",
    "visurf_advantages_with_stats",
    "smooth_gt_rewards",
    "register_advantage_estimator",
    "get_advantage_estimator",
    "ADVANTAGE_ESTIMATORS",
]


# --------------------------------------------------------------------------------------------
# group bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class GroupStats:
    """Per-group moments of ``values`` over the rows selected by ``member``.

    ``inverse`` maps each row to its group slot 0..num_groups-1 (slots follow ``ids``, the sorted
    unique group ids). Rows outside ``member`` belong to a slot but do not enter its moments.
    """

    ids: Tensor  # [K] sorted unique group ids
    inverse: Tensor  # [N] slot of each row
    count: Tensor  # [K] number of member rows per group (float)
    mean: Tensor  # [K]
    std: Tensor  # [K] with the requested ddof; 0 where count - ddof <= 0


def _as_float(rewards: Tensor) -> Tensor:
    # Statistics run in float64 so that hand-checked values (e.g. 8/3) hold to ~1e-12 and so that a
    # bf16/fp16 reward tensor never leaks its precision into the normalisation.
    return rewards.detach().to(torch.float64)


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _check_1d(name: str, t: Tensor, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")


def group_stats(
    values: Tensor,
    group_index: Tensor,
    member: Optional[Tensor] = None,
    *,
    std_ddof: int = 1,
) -> GroupStats:
    """Group count, mean and std of ``values`` (float64), restricted to ``member`` rows.

        mean_g = sum_{i in g} v_i / n_g
        std_g  = sqrt( sum_{i in g} (v_i - mean_g)^2 / (n_g - ddof) )   (0 when n_g - ddof <= 0)
    """
    n = values.shape[0]
    _check_1d("group_index", group_index, n)
    v = _as_float(values)
    ids, inverse = torch.unique(group_index, return_inverse=True)
    k = ids.shape[0]
    w = torch.ones_like(v) if member is None else member.to(v.dtype)
    count = torch.zeros(k, dtype=v.dtype, device=v.device).index_add_(0, inverse, w)
    total = torch.zeros_like(count).index_add_(0, inverse, v * w)
    mean = total / count.clamp_min(1.0)
    sq = torch.zeros_like(count).index_add_(0, inverse, (v - mean[inverse]).square() * w)
    dof = count - std_ddof
    std = torch.where(dof > 0, (sq / dof.clamp_min(1.0)).sqrt(), torch.zeros_like(sq))
    return GroupStats(ids=ids, inverse=inverse, count=count, mean=mean, std=std)


def _normalise(
    values: Tensor, stats: GroupStats, *, eps: float, norm_by_std: bool
) -> Tensor:
    """A_i = (v_i - mean_g) / (std_g + eps), or v_i - mean_g (Dr.GRPO); 0 in groups of one."""
    v = _as_float(values)
    centred = v - stats.mean[stats.inverse]
    adv = centred / (stats.std[stats.inverse] + eps) if norm_by_std else centred
    # A lone member has no baseline to compare against: force 0 rather than rely on 0/(0+eps),
    # which is NaN when eps=0.
    return torch.where(stats.count[stats.inverse] > 1, adv, torch.zeros_like(adv))


# --------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO
# --------------------------------------------------------------------------------------------
def grpo_advantages(
    rewards: Tensor,
    group_index: Tensor,
    *,
    eps: float = 1e-6,
    std_ddof: int = 1,
    norm_by_std: bool = True,
) -> Tensor:
    """GRPO outcome advantage, one scalar per row.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      norm_by_std=True  (GRPO)
        A_i =  r_i - mean_g(r)                           norm_by_std=False (Dr.GRPO)

    ``std`` uses ``std_ddof`` (1 = unbiased, as ``torch.std``). A group of one gets 0.
    """
    _check_1d("rewards", rewards, rewards.shape[0])
    stats = group_stats(rewards, group_index, std_ddof=std_ddof)
    return _normalise(rewards, stats, eps=eps, norm_by_std=norm_by_std).to(_out_dtype(rewards))


# --------------------------------------------------------------------------------------------
# ViSurf
# --------------------------------------------------------------------------------------------
@dataclass
class VisurfStats:
    """What the trainer logs about a ViSurf advantage computation.

    ``smoothed`` marks every row of a smoothed group; ``group_smoothed`` is per group slot
    (aligned with ``group_ids``). ``frac_smoothed`` is over groups that have a GT row
    (0 when none has). ``mean_adv_gt`` is the mean GT-row advantage (0 when there is no GT row).
    ``rewards`` are the rewards after smoothing, the values the group statistics used.
    """

    smoothed: Tensor  # [N] bool
    group_smoothed: Tensor  # [K] bool
    group_ids: Tensor  # [K]
    group_has_gt: Tensor  # [K] bool
    rewards: Tensor  # [N] rewards after smoothing
    frac_smoothed: Tensor  # 0-dim float
    mean_adv_gt: Tensor  # 0-dim float
    num_gt_groups: int

    def as_metrics(self, prefix: str = "visurf/") -> Dict[str, Tensor]:
        return {
            f"{prefix}frac_groups_smoothed": self.frac_smoothed,
            f"{prefix}mean_adv_gt": self.mean_adv_gt,
        }


def _check_gt(is_gt: Tensor, inverse: Tensor, k: int) -> Tensor:
    """GT rows per group slot; raises when a group holds more than one."""
    gt_count = torch.zeros(k, dtype=torch.long, device=inverse.device).index_add_(
        0, inverse, is_gt.long()
    )
    if bool((gt_count > 1).any()):
        raise ValueError(
            f"at most one GT row per group is allowed; {int((gt_count > 1).sum())} group(s) have more"
        )
    return gt_count > 0


def smooth_gt_rewards(
    rewards: Tensor,
    group_index: Tensor,
    is_gt: Tensor,
    compare_rewards: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ViSurf reward smoothing (control 3), float64.

        if max_{i<=G} c_i >= c_gt:   r_gt := mean(r_1 .. r_G)

    ``c`` = ``compare_rewards`` (default ``rewards``); the replacement is always the mean of the
    rollouts' ``rewards``. Groups without a GT row or without rollouts are left alone.

    Returns (smoothed rewards [N], smoothed-group flag per row [N], per group slot [K],
    group ids [K], group-has-GT [K]).
    """
    n = rewards.shape[0]
    _check_1d("is_gt", is_gt, n)
    is_gt = is_gt.to(torch.bool)
    r = _as_float(rewards)
    c = r if compare_rewards is None else _as_float(compare_rewards)
    _check_1d("compare_rewards", c, n)
    rollout = ~is_gt
    rs = group_stats(r, group_index, rollout, std_ddof=0)
    k = rs.ids.shape[0]
    has_gt = _check_gt(is_gt, rs.inverse, k)

    # max over rollouts only: GT rows are masked to -inf before the amax.
    masked_c = torch.where(rollout, c, torch.full_like(c, float("-inf")))
    roll_max = torch.full((k,), float("-inf"), dtype=c.dtype, device=c.device).scatter_reduce(
        0, rs.inverse, masked_c, reduce="amax", include_self=True
    )
    gt_c = torch.zeros(k, dtype=c.dtype, device=c.device).index_add_(
        0, rs.inverse, torch.where(is_gt, c, torch.zeros_like(c))
    )
    group_smoothed = has_gt & (rs.count > 0) & (roll_max >= gt_c)
    row_smoothed = group_smoothed[rs.inverse]
    new_r = torch.where(is_gt & row_smoothed, rs.mean[rs.inverse], r)
    return new_r, row_smoothed, group_smoothed, rs.ids, has_gt


def visurf_advantages_with_stats(
    rewards: Tensor,
    group_index: Tensor,
    is_gt: Tensor,
    *,
    smooth: bool = True,
    compare_rewards: Optional[Tensor] = None,
    eps: float = 1e-6,
    std_ddof: int = 1,
    norm_by_std: bool = True,
) -> tuple[Tensor, VisurfStats]:
    """ViSurf advantages over the augmented group [o_1..o_G, y*] plus logging stats.

        (smooth)  if max_i c_i >= c_gt: r_gt := mean(r_1..r_G)
        A_j = (R_j - mean(R)) / (std(R) + eps),   R = [r_1..r_G, r_gt]

    A group without a GT row is plain GRPO. At most one GT row per group (ValueError otherwise).
    In a smoothed group A_gt is exactly 0 and the rollouts get plain GRPO on [r_1..r_G, mean(r)].
    """
    n = rewards.shape[0]
    _check_1d("rewards", rewards, n)
    is_gt = is_gt.to(torch.bool)
    if smooth:
        r, row_sm, grp_sm, ids, has_gt = smooth_gt_rewards(
            rewards, group_index, is_gt, compare_rewards
        )
    else:
        r = _as_float(rewards)
        _check_1d("is_gt", is_gt, n)
        ids, inverse = torch.unique(group_index, return_inverse=True)
        has_gt = _check_gt(is_gt, inverse, ids.shape[0])
        grp_sm = torch.zeros_like(has_gt)
        row_sm = torch.zeros_like(is_gt)

    stats = group_stats(r, group_index, std_ddof=std_ddof)
    adv = _normalise(r, stats, eps=eps, norm_by_std=norm_by_std)
    # Smoothing puts r_gt at the group mean, so A_gt is 0 analytically; pin it so float rounding
    # in the mean cannot leave a 1e-17 SFT term on an answer the policy already matches.
    adv = torch.where(is_gt & row_sm, torch.zeros_like(adv), adv)

    out = adv.to(_out_dtype(rewards))
    num_gt_groups = int(has_gt.sum())
    frac = grp_sm.sum().to(torch.float32) / max(num_gt_groups, 1)
    mean_gt = (
        out[is_gt].float().mean() if bool(is_gt.any()) else torch.zeros((), device=out.device)
    )
    return out, VisurfStats(
        smoothed=row_sm,
        group_smoothed=grp_sm,
        group_ids=ids,
        group_has_gt=has_gt,
        rewards=r.to(_out_dtype(rewards)),
        frac_smoothed=frac,
        mean_adv_gt=mean_gt.detach(),
        num_gt_groups=num_gt_groups,
    )


def visurf_advantages(
    rewards: Tensor,
    group_index: Tensor,
    is_gt: Tensor,
    *,
    smooth: bool = True,
    compare_rewards: Optional[Tensor] = None,
    eps: float = 1e-6,
    std_ddof: int = 1,
    norm_by_std: bool = True,
) -> Tensor:
    """ViSurf advantages; see :func:`visurf_advantages_with_stats` (this drops the stats)."""
    adv, _ = visurf_advantages_with_stats(
        rewards,
        group_index,
        is_gt,
        smooth=smooth,
        compare_rewards=compare_rewards,
        eps=eps,
        std_ddof=std_ddof,
        norm_by_std=norm_by_std,
    )
    return adv


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
AdvantageEstimator = Callable[..., Tensor]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(rewards, group_index, is_gt=None, **kw) -> Tensor`` as ``name``."""

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None


def _rollouts_only(
    rewards: Tensor, group_index: Tensor, is_gt: Optional[Tensor], **kw
) -> Tensor:
    # GT rows, if present, are not members of the group: RLVR-style estimators must not see the
    # answer's reward in their baseline. They get advantage 0; callers mask them out anyway.
    if is_gt is None or not bool(is_gt.any()):
        return grpo_advantages(rewards, group_index, **kw)
    is_gt = is_gt.to(torch.bool)
    stats = group_stats(rewards, group_index, ~is_gt, std_ddof=kw.get("std_ddof", 1))
    adv = _normalise(
        rewards, stats, eps=kw.get("eps", 1e-6), norm_by_std=kw.get("norm_by_std", True)
    )
    return torch.where(is_gt, torch.zeros_like(adv), adv).to(_out_dtype(rewards))


@register_advantage_estimator("grpo")
def _grpo(rewards: Tensor, group_index: Tensor, is_gt: Optional[Tensor] = None, **kw) -> Tensor:
    """GRPO over the rollouts of each group; GT rows (if any) excluded and given 0."""
    return _rollouts_only(rewards, group_index, is_gt, **kw)


@register_advantage_estimator("drgrpo")
def _drgrpo(rewards: Tensor, group_index: Tensor, is_gt: Optional[Tensor] = None, **kw) -> Tensor:
    """Dr.GRPO: A = r - mean_g(r) over the rollouts; GT rows (if any) excluded and given 0."""
    kw["norm_by_std"] = False
    return _rollouts_only(rewards, group_index, is_gt, **kw)


@register_advantage_estimator("visurf")
def _visurf(rewards: Tensor, group_index: Tensor, is_gt: Optional[Tensor] = None, **kw) -> Tensor:
    """ViSurf: GRPO over the augmented group (rollouts + GT row), smoothing on by default."""
    if is_gt is None:
        is_gt = torch.zeros(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    return visurf_advantages(rewards, group_index, is_gt, **kw)
