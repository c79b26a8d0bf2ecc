"""Training paradigms behind one config switch: SFT, RLVR, SFT->RLVR, ViSurf, LUFFY, CHORD, HPT.

Batch layout shared by all of them: rows are responses, ``group_index`` ties the rows of one prompt
together and ``is_gt`` marks the ground-truth / external answer row (at most one per group), which
shares the prompt tensors with the rollouts and is teacher forced. A paradigm decides

  * whether GT rows enter the batch (``uses_gt_rows(step)``) and whether rollouts must be sampled
    (``needs_rollouts(step)``),
  * what every row is trained with (``compute_row_info(rows, step) -> RowInfo``): the clipped
    policy-gradient surrogate with an advantage (``pg_rows``), LUFFY's shaped surrogate
    (``shaped_rows``) or the NLL (``sft_rows``); rows in none of them are ignored,
  * the scalar loss from per-token log-probs (``loss(logp, old_logp, mask, row_info, step)``).

Trainer flow::

    p = paradigm_from_config(cfg.algorithm)        # or get_paradigm(name, **knobs)
    info = p.compute_row_info(RowBatch(rewards, group_index, is_gt, correct, compare_rewards), step)
    for idx in micro_batches:                      # advantages need whole groups: compute first
        loss, metrics = p.loss(logp[idx], old_logp[idx], mask[idx], info.select(idx), step)

Unless a paradigm says otherwise (CHORD), the per-token losses of all active rows are aggregated
together with the configured ``agg`` mode, so e.g. ViSurf's GT row and rollouts share one
token-mean (VISURF.md Eq. 8).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor

from .advantages import get_advantage_estimator, visurf_advantages_with_stats
from .losses import (
    _agg_fn,
    aggregate,
    aggregation_normaliser,
    entropy_bonus,
    k3_kl,
    masked_mean,
    policy_shaping_token_loss,
    ppo_clip_token_loss,
)
from .rows import RowBatch, RowInfo, filter_groups, row_info, rows_mask

__all__ = [
    "RowBatch", "RowInfo", "Paradigm", "PARADIGMS", "register_paradigm", "get_paradigm",
    "paradigm_from_config", "filter_groups", "MU_SCHEDULES", "mu_at",
    "SFT", "RLVR", "SFTThenRLVR", "ViSurf", "LUFFY", "CHORD", "HPT",
]


# --------------------------------------------------------------------------------------------
# base class and registry
# --------------------------------------------------------------------------------------------
PARADIGMS: Dict[str, Type["Paradigm"]] = {}


def register_paradigm(name: str) -> Callable[[Type["Paradigm"]], Type["Paradigm"]]:
    def deco(cls: Type["Paradigm"]) -> Type["Paradigm"]:
        cls.name = name
        PARADIGMS[name] = cls
        return cls

    return deco


def get_paradigm(name: str, **cfg: Any) -> "Paradigm":
    """Instantiate the paradigm ``name`` with constructor knobs ``cfg`` (unknown knobs: TypeError)."""
    try:
        cls = PARADIGMS[name]
    except KeyError:
        raise KeyError(f"unknown paradigm {name!r}; known: {sorted(PARADIGMS)}") from None
    return cls(**cfg)


def paradigm_from_config(cfg: Any) -> "Paradigm":
    """The paradigm an ``AlgorithmConfig`` (``visurf_megatron.config``) asks for.

    Field -> knob: loss_agg -> agg, sft_then_rlvr_switch_step -> switch_step, luffy_gamma -> gamma,
    chord_mu_{schedule,start,end,steps,warmup_steps} -> mu_*, hpt_correct_threshold ->
    correct_threshold. ``smooth_compare`` and ``filter_groups`` are the trainer's: they choose what
    goes into ``RowBatch.compare_rewards`` and whether ``filter_groups`` runs.
    """
    common = {k: getattr(cfg, k) for k in (
        "clip_low", "clip_high", "dual_clip", "eps", "std_ddof", "norm_by_std", "entropy_coef", "kl_coef")}
    common["agg"] = cfg.loss_agg
    chord = {k: getattr(cfg, f"chord_{k}") for k in (
        "mu_schedule", "mu_start", "mu_end", "mu_steps", "mu_warmup_steps") if hasattr(cfg, f"chord_{k}")}
    specific = {
        "visurf": {"smooth": cfg.smooth},
        "sft_then_rlvr": {"switch_step": cfg.sft_then_rlvr_switch_step},
        "luffy": {"gamma": cfg.luffy_gamma},
        "chord": chord,
        "hpt": {"correct_threshold": cfg.hpt_correct_threshold},
    }.get(cfg.paradigm, {})
    return get_paradigm(cfg.paradigm, **common, **specific)


class Paradigm:
    """Common knobs (VISURF.md defaults) and the shared mixed-row loss.

    clip_low/clip_high  PPO clip range (clip-higher allowed); dual_clip: c > 1 or None
    agg                 loss aggregation mode (see ``losses``)
    eps, std_ddof, norm_by_std   group normalisation (norm_by_std=False: Dr.GRPO)
    entropy_coef        entropy bonus (0: off); kl_coef: k3 KL to a reference (0: off, no KL)
    """

    name = "base"

    def __init__(
        self,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: Optional[float] = None,
        agg: str = "token-mean",
        eps: float = 1e-6,
        std_ddof: int = 1,
        norm_by_std: bool = True,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.0,
    ) -> None:
        _agg_fn(agg)  # fail at construction, not at the first loss
        if dual_clip is not None and dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.agg = agg
        self.eps, self.std_ddof, self.norm_by_std = eps, std_ddof, norm_by_std
        self.entropy_coef, self.kl_coef = entropy_coef, kl_coef

    # ---- what the batch holds -------------------------------------------------------------
    def uses_gt_rows(self, step: int) -> bool:
        raise NotImplementedError

    def needs_rollouts(self, step: int) -> bool:
        raise NotImplementedError

    # ---- per-row roles ---------------------------------------------------------------------
    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        raise NotImplementedError

    def _norm_kw(self) -> Dict[str, Any]:
        return dict(eps=self.eps, std_ddof=self.std_ddof, norm_by_std=self.norm_by_std)

    def _rollout_grpo(self, rows: RowBatch) -> Tensor:
        """GRPO over each group's rollouts; GT rows excluded from the statistics, given 0."""
        return get_advantage_estimator("grpo")(rows.rewards, rows.group_index, rows.is_gt, **self._norm_kw())

    def _resolve(self, row_info: Union[RowInfo, RowBatch], step: int) -> RowInfo:
        return self.compute_row_info(row_info, step) if isinstance(row_info, RowBatch) else row_info

    # ---- loss ------------------------------------------------------------------------------
    def normalisers(self, mask: Tensor, row_info: RowInfo, step: int = 0) -> Dict[str, Tensor]:
        """Default aggregation denominators of this micro-batch, keyed like ``loss(norms=...)``.

        Sum them over micro-batches / data-parallel ranks (see ``aggregation_normaliser``) and pass
        the totals back to ``loss`` to weigh every token of the global batch equally.
        """
        return {"loss": aggregation_normaliser(rows_mask(mask, row_info.active_rows), self.agg)}

    def loss(
        self,
        logp: Tensor,
        old_logp: Optional[Tensor],
        mask: Tensor,
        row_info: Union[RowInfo, RowBatch],
        step: int = 0,
        *,
        entropy: Optional[Tensor] = None,
        ref_logp: Optional[Tensor] = None,
        norms: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Mixed-row loss, one aggregation over all active rows' tokens:

            l_{b,t} = max(-rho A_b, -clip(rho) A_b)   b in pg_rows
                    = -A_b p/(p+gamma)                 b in shaped_rows
                    = -logp_{b,t}                      b in sft_rows
            L = agg(l) [+ kl_coef agg(k3)] [- entropy_coef agg(H)]

        ``row_info`` may be a ``RowBatch`` (row roles computed on the spot: full batch only).
        """
        info = self._resolve(row_info, step)
        return self._mixed_loss(logp, old_logp, mask, info, step, entropy, ref_logp, norms)

    def _shaping_gamma(self) -> Optional[float]:
        return None

    def _ppo(self, logp, old_logp, adv, pg_mask) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Clipped-surrogate token loss and its metrics over ``pg_mask`` (see ``policy_loss``)."""
        if old_logp is None:
            raise ValueError(f"{self.name}: old_logp is required for the policy-gradient rows")
        mat, pinfo = ppo_clip_token_loss(
            logp, old_logp, adv, clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip
        )
        with torch.no_grad():
            metrics = {
                "clip_frac": masked_mean(pinfo["clipped"].to(pg_mask.dtype), pg_mask),
                "approx_kl": masked_mean(old_logp - logp, pg_mask),
                "ratio_mean": masked_mean(pinfo["ratio"], pg_mask),
            }
            if self.dual_clip is not None:
                metrics["dual_clip_frac"] = masked_mean(pinfo["dual_clipped"].to(pg_mask.dtype), pg_mask)
        return mat, metrics

    def _mixed_loss(self, logp, old_logp, mask, info, step, entropy, ref_logp, norms):
        norm = None if norms is None else norms.get("loss")
        m = mask.to(logp.dtype)
        active = rows_mask(m, info.active_rows)
        pg_m = rows_mask(m, info.pg_rows)
        loss_mat = torch.zeros_like(logp)
        metrics: Dict[str, Tensor] = {}
        if self.needs_rollouts(step):
            ppo, metrics = self._ppo(logp, old_logp, info.advantages, pg_m)
            loss_mat = torch.where(info.pg_rows.unsqueeze(-1), ppo, loss_mat)
        gamma = self._shaping_gamma()
        if gamma is not None:
            shaped = policy_shaping_token_loss(logp, info.advantages, gamma=gamma)
            loss_mat = torch.where(info.shaped_rows.unsqueeze(-1), shaped, loss_mat)
        loss_mat = torch.where(info.sft_rows.unsqueeze(-1), -logp, loss_mat)
        loss = aggregate(loss_mat, active, self.agg, norm=norm)
        metrics["policy_loss"] = loss.detach()
        with torch.no_grad():
            metrics["sft_nll"] = masked_mean(-logp, rows_mask(m, info.sft_rows))
        loss, extra = self._regularisers(loss, logp, active, entropy, ref_logp, norm)
        metrics.update(extra)
        metrics.update(info.metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _regularisers(self, loss, logp, mask, entropy, ref_logp, norm):
        metrics: Dict[str, Tensor] = {}
        if self.kl_coef != 0.0 and ref_logp is not None:
            kl = aggregate(k3_kl(logp, ref_logp), mask, self.agg, norm=norm)
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.detach()
        if entropy is not None:
            with torch.no_grad():
                metrics["entropy"] = masked_mean(entropy, mask)
            if self.entropy_coef != 0.0:
                loss = loss + entropy_bonus(entropy, mask, coef=self.entropy_coef, agg=self.agg, norm=norm)
        return loss, metrics


# --------------------------------------------------------------------------------------------
# paradigms
# --------------------------------------------------------------------------------------------
@register_paradigm("sft")
class SFT(Paradigm):
    """Teacher-forced NLL on the GT rows only: L = agg(-logp) over is_gt rows. No rollouts."""

    def uses_gt_rows(self, step: int) -> bool:
        return True

    def needs_rollouts(self, step: int) -> bool:
        return False

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        return row_info(rows, sft=rows.is_gt.clone())


@register_paradigm("rlvr")
class RLVR(Paradigm):
    """GRPO (or Dr.GRPO with norm_by_std=False) on the rollouts; GT rows are not wanted and, if
    present, take no part in the advantages or the loss."""

    def uses_gt_rows(self, step: int) -> bool:
        return False

    def needs_rollouts(self, step: int) -> bool:
        return True

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        return row_info(rows, self._rollout_grpo(rows), pg=~rows.is_gt)


@register_paradigm("sft_then_rlvr")
class SFTThenRLVR(Paradigm):
    """Two stages: SFT for step < switch_step, RLVR from switch_step on."""

    def __init__(self, *, switch_step: int = 0, **common: Any) -> None:
        super().__init__(**common)
        self.switch_step = switch_step
        self.sft, self.rlvr = SFT(**common), RLVR(**common)

    def stage(self, step: int) -> Paradigm:
        return self.sft if step < self.switch_step else self.rlvr

    def uses_gt_rows(self, step: int) -> bool:
        return self.stage(step).uses_gt_rows(step)

    def needs_rollouts(self, step: int) -> bool:
        return self.stage(step).needs_rollouts(step)

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        return self.stage(step).compute_row_info(rows, step)

    def normalisers(self, mask, row_info, step=0):
        return self.stage(step).normalisers(mask, row_info, step)

    def loss(self, logp, old_logp, mask, row_info, step=0, **kw):
        return self.stage(step).loss(logp, old_logp, mask, row_info, step, **kw)


@register_paradigm("visurf")
class ViSurf(Paradigm):
    """GT row joins its group as member G+1; GRPO advantages over the augmented group with
    reward smoothing; one clipped surrogate over all G+1 rows, no KL (VISURF.md Eq. 6-8).

    With rho = 1 the gradient is sum_j A_j grad log pi(o_j): an SFT term on y* weighted by A_gt
    plus the RLVR term on the rollouts.
    """

    def __init__(self, *, smooth: bool = True, **common: Any) -> None:
        super().__init__(**common)
        self.smooth = smooth

    def uses_gt_rows(self, step: int) -> bool:
        return True

    def needs_rollouts(self, step: int) -> bool:
        return True

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        adv, stats = visurf_advantages_with_stats(
            rows.rewards, rows.group_index, rows.is_gt, smooth=self.smooth,
            compare_rewards=rows.compare_rewards, **self._norm_kw(),
        )
        pg = torch.ones_like(rows.is_gt)
        return row_info(rows, adv, pg=pg, metrics=stats.as_metrics(), extras={"stats": stats})


@register_paradigm("luffy")
class LUFFY(Paradigm):
    """LUFFY: advantages over the mixed group (rollouts + external row, no smoothing); rollouts use
    the clipped surrogate, the external row the shaped one -A p/(p+gamma) with no clip and no
    old-policy ratio (the external policy's probability is taken as 1)."""

    def __init__(self, *, gamma: float = 0.1, **common: Any) -> None:
        super().__init__(**common)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def uses_gt_rows(self, step: int) -> bool:
        return True

    def needs_rollouts(self, step: int) -> bool:
        return True

    def _shaping_gamma(self) -> Optional[float]:
        return self.gamma

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        adv, _ = visurf_advantages_with_stats(
            rows.rewards, rows.group_index, rows.is_gt, smooth=False, **self._norm_kw()
        )
        return row_info(rows, adv, pg=~rows.is_gt, shaped=rows.is_gt.clone())


# ---- CHORD mu schedules: fn(t, start, end, steps) with t = step after warm-up ----------------
MuSchedule = Callable[[int, float, float, int], float]
MU_SCHEDULES: Dict[str, MuSchedule] = {
    "constant": lambda t, a, b, n: a,
    # linear interpolation start -> end over n steps, then held (a ramp up or down)
    "linear": lambda t, a, b, n: b if t >= n else a + (b - a) * t / max(n, 1),
    # cosine start -> end over n steps, then held (CHORD's decay)
    "cosine": lambda t, a, b, n: b if t >= n else b + (a - b) * 0.5 * (1 + math.cos(math.pi * t / max(n, 1))),
}


def mu_at(step: int, schedule: str, start: float, end: float, steps: int, warmup_steps: int = 0) -> float:
    """CHORD's mu at ``step``: linear 0 -> start over ``warmup_steps``, then ``schedule`` from
    start to end over ``steps`` (as Trinity-RFT's ``mu_schedule_function`` for 'cosine')."""
    try:
        fn = MU_SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown mu schedule {schedule!r}; known: {sorted(MU_SCHEDULES)}") from None
    if step < warmup_steps:
        return start * step / warmup_steps
    return float(fn(step - warmup_steps, start, end, steps))


@register_paradigm("chord")
class CHORD(Paradigm):
    """CHORD: L = (1 - mu) L_GRPO + mu L_SFT, each term aggregated over its own rows.

    L_GRPO: clipped surrogate on the rollouts with rollout-only GRPO advantages (GT rows excluded).
    L_SFT:  NLL on the GT rows; ``phi=True`` weights each token by p(1-p) (CHORD-phi, detached).
    mu follows ``mu_at`` (defaults: cosine 0.9 -> 0.05 over 200 steps, no warm-up; a config
    choice, not prescribed by VISURF.md).
    """

    def __init__(
        self,
        *,
        mu_schedule: str = "cosine",
        mu_start: float = 0.9,
        mu_end: float = 0.05,
        mu_steps: int = 200,
        mu_warmup_steps: int = 0,
        phi: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        mu_at(0, mu_schedule, mu_start, mu_end, mu_steps, mu_warmup_steps)  # validate name
        self.mu_schedule, self.mu_start, self.mu_end = mu_schedule, mu_start, mu_end
        self.mu_steps, self.mu_warmup_steps, self.phi = mu_steps, mu_warmup_steps, phi

    def mu(self, step: int) -> float:
        return mu_at(step, self.mu_schedule, self.mu_start, self.mu_end, self.mu_steps, self.mu_warmup_steps)

    def uses_gt_rows(self, step: int) -> bool:
        return True

    def needs_rollouts(self, step: int) -> bool:
        return True

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        return row_info(rows, self._rollout_grpo(rows), pg=~rows.is_gt, sft=rows.is_gt.clone())

    def normalisers(self, mask, row_info, step=0):
        return {
            "pg": aggregation_normaliser(rows_mask(mask, row_info.pg_rows), self.agg),
            "sft": aggregation_normaliser(rows_mask(mask, row_info.sft_rows), self.agg),
        }

    def loss(self, logp, old_logp, mask, row_info, step=0, *, entropy=None, ref_logp=None, norms=None):
        info = self._resolve(row_info, step)
        norms = norms or {}
        m = mask.to(logp.dtype)
        pg_m, sft_m = rows_mask(m, info.pg_rows), rows_mask(m, info.sft_rows)
        ppo, metrics = self._ppo(logp, old_logp, info.advantages, pg_m)
        pg = aggregate(ppo, pg_m, self.agg, norm=norms.get("pg"))
        nll = -logp
        if self.phi:
            p = torch.exp(logp.detach())
            nll = nll * p * (1 - p)
        sft = aggregate(nll, sft_m, self.agg, norm=norms.get("sft"))
        mu = self.mu(step)
        loss = (1.0 - mu) * pg + mu * sft
        metrics.update(mu=torch.tensor(mu), pg_loss=pg.detach(), sft_loss=sft.detach())
        # KL and entropy regularise the on-policy part only.
        loss, extra = self._regularisers(loss, logp, pg_m, entropy, ref_logp, norms.get("pg"))
        metrics.update(extra)
        metrics.update(info.metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics


@register_paradigm("hpt")
class HPT(Paradigm):
    """HPT, per prompt: if at least ``min_correct`` rollouts are correct, RL (GRPO) on the rollouts
    only; otherwise SFT on the GT row and the rollouts are dropped. A rollout is correct when
    ``RowBatch.correct`` says so, else when its ``compare_rewards`` (default ``rewards``) is
    >= ``correct_threshold``. All active rows share one aggregation.
    """

    def __init__(self, *, correct_threshold: float = 1.0, min_correct: int = 1, **common: Any) -> None:
        super().__init__(**common)
        self.correct_threshold, self.min_correct = correct_threshold, min_correct

    def uses_gt_rows(self, step: int) -> bool:
        return True

    def needs_rollouts(self, step: int) -> bool:
        return True

    def rl_groups(self, rows: RowBatch) -> Tensor:
        """bool [N]: the row's prompt is trained with RL (enough correct rollouts)."""
        if rows.correct is not None:
            correct = rows.correct
        else:
            value = rows.rewards if rows.compare_rewards is None else rows.compare_rewards
            correct = value >= self.correct_threshold
        ids, inv = torch.unique(rows.group_index, return_inverse=True)
        n_ok = torch.zeros(ids.shape[0], dtype=torch.long, device=inv.device).index_add_(
            0, inv, (correct & ~rows.is_gt).long()
        )
        return (n_ok >= self.min_correct)[inv]

    def compute_row_info(self, rows: RowBatch, step: int = 0) -> RowInfo:
        rl = self.rl_groups(rows)
        adv = torch.where(rl, self._rollout_grpo(rows), torch.zeros_like(rows.rewards))
        frac_sft = 1.0 - rl[rows.is_gt].float().mean() if bool(rows.is_gt.any()) else torch.zeros(())
        return row_info(
            rows, adv, pg=rl & ~rows.is_gt, sft=~rl & rows.is_gt,
            metrics={"hpt/frac_groups_sft": frac_sft},
        )
