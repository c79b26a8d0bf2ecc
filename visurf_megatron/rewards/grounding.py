"""VisionReasoner / Seg-Zero grounding reward (max 7): thinking 1 + answer format 2 + accuracy 3 + non-repeat 1.

Follows the authors' ``vision_reasoner_format_reward`` / ``_accuracy_reward`` / ``_non_repeat_reward``
with the choices ViSurf leaves open made explicit (see VISURF.md "Rewards"):

* matching maximises the summed per-pair reward: ``linear_sum_assignment`` on
  ``cost = -(iou_hit + l1_hit + point_hit)`` (the authors write ``3 - reward``; same assignment);
* an empty GT is handled explicitly (the authors' code crashes to 0 there);
* more than ``max_objects`` predicted objects scores accuracy 0 instead of the authors' truncation,
  so spamming objects can never pay and the matching cost stays bounded;
* a box with x2 < x1 or y2 < y1 is not a box: 0 for its format point and for all its accuracy terms
  (a point cannot lie inside it either).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from visurf_megatron.rewards.parsing import (
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    ParsedResponse,
    coordinates,
    object_box,
    object_point,
    parse_response,
)
from visurf_megatron.rewards.types import RewardBreakdown

MAX_OBJECTS = 120
IOU_THRESHOLD = 0.5  # strict >
L1_THRESHOLD_PX = 10.0  # strict <, mean over the 4 box coordinates
POINT_THRESHOLD_PX = 30.0  # strict <, Euclidean
MAX_ACCURACY = 3.0
MAX_ANSWER_FORMAT = 2.0
REPEATS_ALLOWED = 1  # the authors zero the term on the second repeated sentence


def load_solution(solution: Any) -> list[dict[str, Any]]:
    """GT objects from a list or its JSON string; malformed GT is a data bug, so it raises."""
    if isinstance(solution, (str, bytes)):
        if len(solution) > MAX_ANSWER_CHARS * 16:
            raise ValueError("grounding solution JSON is implausibly large")
        solution = json.loads(solution)
    if not isinstance(solution, (list, tuple)):
        raise ValueError(f"grounding solution must be a list of objects, got {type(solution).__name__}")
    objects = list(solution)
    for index, obj in enumerate(objects):
        if object_box(obj) is None or object_point(obj) is None:
            raise ValueError(f"grounding solution object {index} needs a valid bbox_2d and point_2d: {obj!r}")
    return objects


def thinking_reward(parsed: ParsedResponse, *, is_ground_truth: bool = False) -> float:
    # The GT row has no reasoning trace; paying it for format would bias every ViSurf group (control 2).
    return 0.0 if is_ground_truth or not parsed.thinking_format_ok else 1.0


def object_format_score(obj: dict[str, Any]) -> float:
    return float(object_box(obj) is not None) + float(object_point(obj) is not None)


def answer_format_reward(parsed: ParsedResponse, gt_is_empty: bool) -> float:
    """0..2: mean over predicted objects of (valid bbox_2d) + (valid point_2d)."""
    objects = parsed.objects
    if objects is None:
        return 0.0
    if not objects:
        # ``[]`` is the correct shape only for a no-object sample.
        return MAX_ANSWER_FORMAT if gt_is_empty else 0.0
    return sum(object_format_score(obj) for obj in objects) / len(objects)


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(M,N) IoU with inclusive pixel areas ``(x2-x1+1)*(y2-y1+1)``, as the authors' ``batch_iou``.

    Overflowing coordinates (e.g. 1e308) give inf/nan here; callers compare with thresholds, and
    every comparison with nan is False, so such pairs simply score 0.
    """
    x1 = np.maximum(pred[:, None, 0], gt[None, :, 0])
    y1 = np.maximum(pred[:, None, 1], gt[None, :, 1])
    x2 = np.minimum(pred[:, None, 2], gt[None, :, 2])
    y2 = np.minimum(pred[:, None, 3], gt[None, :, 3])
    inter = np.maximum(0.0, x2 - x1 + 1.0) * np.maximum(0.0, y2 - y1 + 1.0)
    pred_area = (pred[:, 2] - pred[:, 0] + 1.0) * (pred[:, 3] - pred[:, 1] + 1.0)
    gt_area = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
    return inter / (pred_area[:, None] + gt_area[None, :] - inter)


def pair_scores(pred_objects: Sequence[Any], gt_objects: Sequence[dict[str, Any]]) -> np.ndarray:
    """(M,N) per-pair accuracy in {0,1,2,3}: IoU hit + L1 hit + point hit."""
    boxes = [object_box(obj) for obj in pred_objects]
    points = [object_point(obj) for obj in pred_objects]
    has_box = np.array([box is not None for box in boxes])
    has_point = np.array([point is not None for point in points])
    # Placeholders for missing values are masked out below; they never score.
    pred_boxes = np.array([box if box is not None else (0.0, 0.0, 0.0, 0.0) for box in boxes], dtype=np.float64)
    pred_points = np.array([pt if pt is not None else (0.0, 0.0) for pt in points], dtype=np.float64)
    gt_boxes = np.array([coordinates(obj["bbox_2d"], 4) for obj in gt_objects], dtype=np.float64)
    gt_points = np.array([coordinates(obj["point_2d"], 2) for obj in gt_objects], dtype=np.float64)

    with np.errstate(all="ignore"):
        iou_hit = iou_matrix(pred_boxes, gt_boxes) > IOU_THRESHOLD
        l1_hit = np.abs(pred_boxes[:, None, :] - gt_boxes[None, :, :]).mean(axis=2) < L1_THRESHOLD_PX
        dist = np.hypot(pred_points[:, None, 0] - gt_points[None, :, 0], pred_points[:, None, 1] - gt_points[None, :, 1])
        inside_own_box = (
            (pred_points[:, 0] >= pred_boxes[:, 0])
            & (pred_points[:, 0] <= pred_boxes[:, 2])
            & (pred_points[:, 1] >= pred_boxes[:, 1])
            & (pred_points[:, 1] <= pred_boxes[:, 3])
        )
    box_ok = has_box[:, None]
    point_hit = (dist < POINT_THRESHOLD_PX) & (has_point & has_box & inside_own_box)[:, None]
    return (iou_hit & box_ok).astype(np.float64) + (l1_hit & box_ok) + point_hit


def accuracy_reward(parsed: ParsedResponse, gt_objects: Sequence[dict[str, Any]], *, max_objects: int = MAX_OBJECTS) -> float:
    """0..3: Hungarian-matched per-pair scores summed, divided by max(#pred, #GT)."""
    pred_objects = parsed.objects
    if pred_objects is None:
        return 0.0
    if not gt_objects or not pred_objects:
        return MAX_ACCURACY if not gt_objects and not pred_objects else 0.0
    if len(pred_objects) > max_objects:
        return 0.0
    scores = pair_scores(pred_objects, gt_objects)
    rows, cols = linear_sum_assignment(-scores)
    return float(scores[rows, cols].sum()) / max(len(pred_objects), len(gt_objects))


def non_repeat_reward(text: str) -> float:
    """1 unless the '.'-split sentences contain a second repeat (the authors' ``repeats >= 2``)."""
    seen: set[str] = set()
    repeats = 0
    for sentence in text.split("."):
        sentence = sentence.strip()
        if not sentence:
            continue
        if sentence in seen:
            repeats += 1
            if repeats > REPEATS_ALLOWED:
                return 0.0
        seen.add(sentence)
    return 1.0


def non_repeat_of(parsed: ParsedResponse, response: Any) -> float:
    """Non-repeat over the reasoning (or the whole response without one); 0 for unreadable responses.

    Only the reasoning is checked so decimal coordinates in the answer do not count as sentences.
    """
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    return non_repeat_reward(parsed.think if parsed.think is not None else response)


def vision_reasoner_reward(
    response: str,
    solution: Any,
    *,
    is_ground_truth: bool = False,
    max_objects: int = MAX_OBJECTS,
) -> RewardBreakdown:
    """Reward one grounding response against GT ``[{"bbox_2d": [x1,y1,x2,y2], "point_2d": [x,y]}, ...]``.

    ``is_ground_truth=True`` scores the rendered GT row of ViSurf: its thinking term is 0, so it
    scores at most 6 while a perfect rollout scores 7.
    """
    gt_objects = load_solution(solution)
    parsed = parse_response(response)
    return RewardBreakdown(
        thinking=thinking_reward(parsed, is_ground_truth=is_ground_truth),
        answer_format=answer_format_reward(parsed, gt_is_empty=not gt_objects),
        accuracy=accuracy_reward(parsed, gt_objects, max_objects=max_objects),
        non_repeat=non_repeat_of(parsed, response),
    )
