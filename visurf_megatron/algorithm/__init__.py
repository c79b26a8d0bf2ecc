"""ViSurf algorithm core: advantages, token losses and training paradigms (pure torch)."""
from .advantages import (
    get_advantage_estimator,
    grpo_advantages,
    register_advantage_estimator,
    visurf_advantages,
    visurf_advantages_with_stats,
)
from .losses import aggregate, entropy_bonus, policy_loss, sft_loss
from .paradigms import PARADIGMS, RowBatch, RowInfo, filter_groups, get_paradigm

__all__ = [
    "get_advantage_estimator",
    "grpo_advantages",
    "register_advantage_estimator",
    "visurf_advantages",
    "visurf_advantages_with_stats",
    "aggregate",
    "entropy_bonus",
    "policy_loss",
    "sft_loss",
    "PARADIGMS",
    "RowBatch",
    "RowInfo",
    "filter_groups",
    "get_paradigm",
]
