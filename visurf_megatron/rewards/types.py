"""The one reward record every task returns, so the trainer can log and smooth terms uniformly."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
    """Per-term rewards of one response; ``total`` is always their sum.

    Tasks leave the terms they do not have at 0, so a logger can treat every task alike.
    ``total`` is derived, never passed, so it cannot disagree with the terms.
    """

    thinking: float = 0.0
    answer_format: float = 0.0
    accuracy: float = 0.0
    non_repeat: float = 0.0
    total: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        terms = (self.thinking, self.answer_format, self.accuracy, self.non_repeat)
        for value in terms:
            # A NaN reward would poison the group mean/std of every rollout in the group.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward terms must be finite numbers, got {terms!r}")
        for name in ("thinking", "answer_format", "accuracy", "non_repeat"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "total", float(sum(terms)))

    def without_thinking(self) -> "RewardBreakdown":
        """The same record with the thinking term zeroed (ViSurf control 2, the GT row)."""
        return RewardBreakdown(
            thinking=0.0, answer_format=self.answer_format, accuracy=self.accuracy, non_repeat=self.non_repeat
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "thinking": self.thinking,
            "answer_format": self.answer_format,
            "accuracy": self.accuracy,
            "non_repeat": self.non_repeat,
            "total": self.total,
        }
