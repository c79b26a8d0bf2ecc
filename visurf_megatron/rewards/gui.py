"""GUI grounding reward: thinking 0/1 + answer format 0..2 + accuracy 0/1 + non-repeat 0/1 (max 5).

Accuracy follows the authors' GUI evaluation: a hit when any predicted point lies inside the GT
element box (inclusive). An object without a valid point contributes its box centre instead, so a
box-only answer can still click. Format and non-repeat are the grounding terms, since GUI prompts
ask for the same object list.
"""
from __future__ import annotations

import json
from typing import Any

from visurf_megatron.rewards.grounding import (
    MAX_OBJECTS,
    answer_format_reward,
    non_repeat_of,
    thinking_reward,
)
from visurf_megatron.rewards.parsing import coordinates, object_box, object_point, parse_response
from visurf_megatron.rewards.types import RewardBreakdown


def load_gui_box(solution: Any) -> tuple[float, float, float, float]:
    """GT element box from ``[x1,y1,x2,y2]``, ``{"bbox_2d": [...]}``, a one-object list, or their JSON."""
    if isinstance(solution, (str, bytes)):
        solution = json.loads(solution)
    if isinstance(solution, (list, tuple)) and len(solution) == 1 and isinstance(solution[0], dict):
        solution = solution[0]
    if isinstance(solution, dict):
        solution = solution.get("bbox_2d")
    box = coordinates(solution, 4)
    if box is None or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"GUI solution must be a box [x1, y1, x2, y2] with x1<=x2, y1<=y2, got {solution!r}")
    return box  # type: ignore[return-value]


def click_point(obj: Any) -> tuple[float, float] | None:
    """Where an object clicks: its point, else the centre of its valid box."""
    point = object_point(obj)
    if point is not None:
        return point
    box = object_box(obj)
    if box is None:
        return None
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def gui_accuracy(objects: list[Any] | None, gt_box: tuple[float, float, float, float], *, max_objects: int = MAX_OBJECTS) -> float:
    # Past the cap a scatter of points could cover the screen; it scores 0 as in grounding.
    if not objects or len(objects) > max_objects:
        return 0.0
    x1, y1, x2, y2 = gt_box
    for obj in objects:
        point = click_point(obj)
        if point is not None and x1 <= point[0] <= x2 and y1 <= point[1] <= y2:
            return 1.0
    return 0.0


def gui_reward(
    response: str,
    solution_box: Any,
    *,
    is_ground_truth: bool = False,
    max_objects: int = MAX_OBJECTS,
) -> RewardBreakdown:
    gt_box = load_gui_box(solution_box)
    parsed = parse_response(response)
    return RewardBreakdown(
        thinking=thinking_reward(parsed, is_ground_truth=is_ground_truth),
        answer_format=answer_format_reward(parsed, gt_is_empty=False),
        accuracy=gui_accuracy(parsed.objects, gt_box, max_objects=max_objects),
        non_repeat=non_repeat_of(parsed, response),
    )
