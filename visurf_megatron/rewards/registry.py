"""One call shape for every task: ``fn(response, sample_solution, *, is_ground_truth=False) -> RewardBreakdown``.

``sample_solution`` per task:

* ``grounding``: list of ``{"bbox_2d", "point_2d"}`` objects (or its JSON string); ``[]`` = no object.
* ``gui``: the element box ``[x1, y1, x2, y2]`` (or ``{"bbox_2d": …}``, or JSON of either).
* ``anomaly``: ``"yes"`` / ``"no"``, or grounding objects (``[]`` = normal image).
* ``math``: the gold answer, or a mapping ``{"answer": …, "choices": [...] or None}``.

Terms per task (terms a task lacks are 0): grounding thinking/format/accuracy(0..3)/non-repeat, max 7;
gui thinking/format/accuracy(0/1)/non-repeat, max 5; math and yes/no anomaly thinking/accuracy(0/1),
max 2; anomaly with object GT is scored as grounding, max 7.
``is_ground_truth=True`` zeroes thinking for every task (ViSurf control 2).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Protocol

from visurf_megatron.rewards.anomaly import anomaly_reward
from visurf_megatron.rewards.grounding import vision_reasoner_reward
from visurf_megatron.rewards.gui import gui_reward
from visurf_megatron.rewards.types import RewardBreakdown


class RewardFn(Protocol):
    def __call__(self, response: str, sample_solution: Any, *, is_ground_truth: bool = False) -> RewardBreakdown: ...


def _math(response: str, sample_solution: Any, *, is_ground_truth: bool = False) -> RewardBreakdown:
    # Imported on first use: math-verify pulls in sympy, which grounding-only runs need not load.
    from visurf_megatron.rewards.math import math_reward

    if isinstance(sample_solution, Mapping):
        return math_reward(
            response,
            sample_solution["answer"],
            choices=sample_solution.get("choices"),
            is_ground_truth=is_ground_truth,
        )
    return math_reward(response, sample_solution, is_ground_truth=is_ground_truth)


_REGISTRY: dict[str, Callable[..., RewardBreakdown]] = {
    "grounding": vision_reasoner_reward,
    "gui": gui_reward,
    "anomaly": anomaly_reward,
    # "Is the named object there": the anomaly reward's yes/no-label branch (format + agreement).
    "existence": anomaly_reward,
    "math": _math,
}


def known_tasks() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_reward_fn(task: str) -> RewardFn:
    try:
        fn = _REGISTRY[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward task {task!r}; known tasks: {', '.join(known_tasks())}") from None

    def reward(response: str, sample_solution: Any, *, is_ground_truth: bool = False) -> RewardBreakdown:
        return fn(response, sample_solution, is_ground_truth=is_ground_truth)

    reward.__name__ = f"{task}_reward"
    reward.__doc__ = fn.__doc__
    return reward
