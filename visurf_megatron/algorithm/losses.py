"""Token-level losses and their aggregation (PPO clipped surrogate, SFT, entropy, k3 KL).

Shapes: per-token tensors are [B, T] (rows x response positions); ``mask`` is 1 on the response
tokens that count (the GT row's tokens included, end-of-turn token included) and 0 on padding.
Per-row advantages are [B] and broadcast over T; [B, T] token advantages are accepted too.

Sign convention: every function returns a quantity to MINIMISE. ``entropy_bonus`` already carries
its minus sign, so the trainer always does ``loss = pg + sft + entropy_bonus(...)``.

Aggregation modes (``aggregate``), verl's names; rows whose mask is all zero are treated as absent
(they count neither as tokens nor as sequences), so masking a row out is the same as dropping it:

    token-mean               sum_{b,t} l m / sum_{b,t} m
    seq-mean-token-mean      mean_b [ sum_t l m / sum_t m ]
    seq-mean-token-sum       mean_b [ sum_t l m ]
    seq-mean-token-sum-norm  sum_{b,t} l m / T            (T = mask.shape[-1], constant: Dr.GRPO)
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "register_agg_mode",
    "aggregate",
    "aggregation_normaliser",
    "masked_mean",
    "log_ratio",
    "ppo_clip_token_loss",
    "policy_shaping_token_loss",
    "k3_kl",
    "policy_loss",
    "sft_loss",
    "entropy_bonus",
]

Number = Union[float, int, Tensor]

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps the ratio finite, as verl does


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
AggFn = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]
AGG_MODES: Dict[str, AggFn] = {}


def register_agg_mode(name: str) -> Callable[[AggFn], AggFn]:
    """Register ``fn(loss_mat, mask) -> (numerator, default denominator)``; loss = num / den."""

    def deco(fn: AggFn) -> AggFn:
        AGG_MODES[name] = fn
        return fn

    return deco


def _safe(den: Tensor) -> Tensor:
    # An all-zero mask must give loss 0 (and zero gradient), never 0/0 = NaN.
    return torch.where(den > 0, den, torch.ones_like(den))


def _row_sums(loss_mat: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    m = mask.to(loss_mat.dtype)
    # where, not multiply: a -inf/NaN on a padded position must not leak through 0 * inf.
    masked = torch.where(m != 0, loss_mat * m, torch.zeros_like(loss_mat))
    return masked.sum(-1), m.sum(-1)


@register_agg_mode("token-mean")
def _token_mean(loss_mat: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    s, n = _row_sums(loss_mat, mask)
    return s.sum(), n.sum()


@register_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    s, n = _row_sums(loss_mat, mask)
    present = n > 0
    return (s / _safe(n)).sum(), present.sum().to(s.dtype)


@register_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    s, n = _row_sums(loss_mat, mask)
    return s.sum(), (n > 0).sum().to(s.dtype)


@register_agg_mode("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    s, _ = _row_sums(loss_mat, mask)
    return s.sum(), torch.tensor(float(mask.shape[-1]), dtype=s.dtype, device=s.device)


def _agg_fn(mode: str) -> AggFn:
    try:
        return AGG_MODES[mode]
    except KeyError:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {sorted(AGG_MODES)}") from None


def aggregation_normaliser(mask: Tensor, mode: str) -> Tensor:
    """The denominator ``aggregate`` would use for ``mask`` (token count, sequence count or T).

    For gradient accumulation or data parallelism the trainer can sum this over micro-batches /
    ranks and pass the global value back as ``aggregate(..., norm=...)`` so every token (or
    sequence) weighs the same whatever micro-batch it landed in. The first three modes' denominators
    are additive; ``seq-mean-token-sum-norm``'s is the constant T (use one fixed max length), not
    a count, so it must not be summed.
    """
    fn = _agg_fn(mode)
    _, den = fn(torch.zeros(mask.shape, dtype=torch.float32, device=mask.device), mask)
    return den


def aggregate(
    loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", *, norm: Optional[Number] = None
) -> Tensor:
    """Reduce a [B, T] token loss to a scalar with ``mode`` (see module docstring).

    ``norm`` overrides the mode's denominator (see :func:`aggregation_normaliser`).
    An all-zero mask gives 0.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ")
    num, den = _agg_fn(mode)(loss_mat, mask)
    if norm is not None:
        den = torch.as_tensor(norm, dtype=num.dtype, device=num.device)
    return num / _safe(den)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """sum(v m) / sum(m), 0 for an empty mask; used for logged statistics (token-mean)."""
    return aggregate(values, mask, "token-mean")


# --------------------------------------------------------------------------------------------
# token losses
# --------------------------------------------------------------------------------------------
def log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """log rho = clamp(logp - old_logp, -20, 20); computed in log space so exp never overflows."""
    return torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _token_adv(advantages: Tensor, like: Tensor) -> Tensor:
    adv = advantages.detach().to(like.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    return adv.expand_as(like)


def ppo_clip_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token PPO clipped surrogate (verl ``compute_policy_loss``).

        rho  = exp(clamp(logp - old_logp, -20, 20))
        l1   = -A rho,   l2 = -A clip(rho, 1 - clip_low, 1 + clip_high)
        l    = max(l1, l2)                               (= -min(rho A, clip(rho) A))
        dual clip c > 1, only where A < 0:  l = min(l, -c A)

    Dual clip (Ye et al. 2020, verl ``clip_ratio_c``): for a negative advantage a huge ratio would
    make -A rho unbounded; capping the loss at c|A| zeroes the gradient of tokens with rho > c.

    Returns the [B, T] loss and bool [B, T] indicators ``ratio`` (float), ``clipped`` (l2 > l1, the
    clipped branch is active) and ``dual_clipped``.
    """
    adv = _token_adv(advantages, logp)
    ratio = torch.exp(log_ratio(logp, old_logp))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(l1, l2)
    info = {"ratio": ratio.detach(), "clipped": l2 > l1}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        l3 = -adv * dual_clip
        neg = adv < 0
        info["dual_clipped"] = neg & (loss > l3)
        loss = torch.where(neg, torch.minimum(loss, l3), loss)
    return loss, info


def policy_shaping_token_loss(logp: Tensor, advantages: Tensor, *, gamma: float = 0.1) -> Tensor:
    """LUFFY off-policy term with policy shaping, no clip, off-policy probability taken as 1.

        l = -A f(p),   f(p) = p / (p + gamma),   p = exp(logp)

    grad l = -A gamma p / (p + gamma)^2 grad logp: low-probability expert tokens keep a large
    gradient instead of the vanishing p * grad logp of a plain importance ratio.
    """
    adv = _token_adv(advantages, logp)
    p = torch.exp(logp.clamp_max(0.0))
    return -adv * (p / (p + gamma))


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = torch.clamp(ref_logp.detach() - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    norm: Optional[Number] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Aggregated PPO clipped surrogate (+ optional k3 KL), ViSurf Eq. 8.

        L = agg_{b,t} max(-rho A_b, -clip(rho, 1-clip_low, 1+clip_high) A_b)  [+ kl_coef agg k3]

    No KL by default: the KL term is added only when ``kl_coef != 0`` and ``ref_logp`` is given.
    Metrics (detached 0-dim tensors, token-mean over ``mask``):
      ``clip_frac``      fraction of tokens on the clipped branch
      ``approx_kl``      k1 estimate mean(old_logp - logp) of KL(pi_old || pi)
      ``ratio_mean``     mean rho
      ``dual_clip_frac`` fraction of tokens capped by the dual clip (only when dual_clip is set)
      ``pg_loss``        the surrogate alone; ``kl`` the k3 mean when the KL term is on.
    """
    loss_mat, info = ppo_clip_token_loss(
        logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    pg = aggregate(loss_mat, mask, agg, norm=norm)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        metrics: Dict[str, Tensor] = {
            "pg_loss": pg.detach(),
            "clip_frac": masked_mean(info["clipped"].to(logp.dtype), m),
            "approx_kl": masked_mean((old_logp - logp).detach(), m),
            "ratio_mean": masked_mean(info["ratio"], m),
        }
        if dual_clip is not None:
            metrics["dual_clip_frac"] = masked_mean(info["dual_clipped"].to(logp.dtype), m)
    loss = pg
    if kl_coef != 0.0 and ref_logp is not None:
        kl = aggregate(k3_kl(logp, ref_logp), mask, agg, norm=norm)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def sft_loss(logp: Tensor, mask: Tensor, *, agg: str = "token-mean", norm: Optional[Number] = None) -> Tensor:
    """Teacher-forced negative log-likelihood, L = agg(-logp)."""
    return aggregate(-logp, mask, agg, norm=norm)


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    *,
    coef: float = 0.0,
    agg: str = "token-mean",
    norm: Optional[Number] = None,
) -> Tensor:
    """Term to ADD to the loss: -coef * agg(entropy). Minimising it raises entropy for coef > 0."""
    if coef == 0.0:
        return entropy.new_zeros(())
    return -coef * aggregate(entropy, mask, agg, norm=norm)
