"""VisionReasoner grounding reward with hand-computed values for every term.

Areas are inclusive (+1 pixel): box [x1,y1,x2,y2] has area (x2-x1+1)*(y2-y1+1).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from visurf_megatron.rewards.grounding import (
    MAX_OBJECTS,
    iou_matrix,
    non_repeat_reward,
    pair_scores,
    vision_reasoner_reward,
)


def obj(box: list[float], point: list[float]) -> dict:
    return {"bbox_2d": box, "point_2d": point}


def respond(objects: list, think: str = "I look at the image.") -> str:
    return f"<think>{think}</think><answer>{json.dumps(objects)}</answer>"


A = obj([0, 0, 99, 99], [50, 50])  # area 100*100 = 10000
B = obj([200, 200, 299, 299], [250, 250])
C = obj([500, 500, 599, 599], [550, 550])


def terms(breakdown) -> tuple[float, float, float, float, float]:
    return breakdown.thinking, breakdown.answer_format, breakdown.accuracy, breakdown.non_repeat, breakdown.total


# --- single object, each term by hand -----------------------------------------------------------

def test_perfect_response_scores_exactly_seven() -> None:
    assert terms(vision_reasoner_reward(respond([A]), [A])) == (1.0, 2.0, 3.0, 1.0, 7.0)


def test_iou_and_point_hit_but_l1_exactly_at_threshold_misses() -> None:
    # pred [0,0,99,59]: area 100*60=6000, inter 6000, union 10000 -> IoU 0.6 > 0.5  (+1)
    # L1 = (0+0+0+|59-99|)/4 = 10, not < 10                                         (+0)
    # point (50,30) inside own box, |(50,30)-(50,50)| = 20 < 30                        (+1)
    pred = obj([0, 0, 99, 59], [50, 30])
    assert terms(vision_reasoner_reward(respond([pred]), [A])) == (1.0, 2.0, 2.0, 1.0, 6.0)


def test_iou_exactly_half_misses() -> None:
    # pred [0,0,99,49]: area 5000, inter 5000, union 10000 -> IoU 0.5, not > 0.5     (+0)
    # L1 = 50/4 = 12.5                                                                 (+0)
    # point (50,25) inside own box, distance 25 < 30                                  (+1)
    pred = obj([0, 0, 99, 49], [50, 25])
    assert vision_reasoner_reward(respond([pred]), [A]).accuracy == 1.0


def test_l1_hit_without_iou_hit() -> None:
    # GT [0,0,9,9] (area 100); pred [0,0,9,0] (area 10*1): inter 10, union 100 -> IoU 0.1  (+0)
    # L1 = (0+0+0+9)/4 = 2.25 < 10                                                       (+1)
    # point (5,0) inside own box; GT point (5,5): distance 5 < 30                         (+1)
    gt = obj([0, 0, 9, 9], [5, 5])
    pred = obj([0, 0, 9, 0], [5, 0])
    assert vision_reasoner_reward(respond([pred]), [gt]).accuracy == 2.0


def test_point_must_lie_inside_its_own_box() -> None:
    # Same box as GT (IoU 1, L1 0 -> +2). The point (120,50) is 10 px from the GT point (110,50),
    # but x=120 > x2=99 of its own predicted box -> no point hit.
    gt = obj([0, 0, 99, 99], [110, 50])
    pred = obj([0, 0, 99, 99], [120, 50])
    assert vision_reasoner_reward(respond([pred]), [gt]).accuracy == 2.0
    inside = obj([0, 0, 99, 99], [99, 50])  # on the edge counts as inside; distance 11
    assert vision_reasoner_reward(respond([inside]), [gt]).accuracy == 3.0


def test_point_distance_threshold_is_strict() -> None:
    gt = obj([0, 0, 99, 99], [50, 20])
    at_30 = obj([0, 0, 99, 99], [50, 50])  # distance exactly 30 -> no point hit
    at_29 = obj([0, 0, 99, 99], [50, 49])
    assert vision_reasoner_reward(respond([at_30]), [gt]).accuracy == 2.0
    assert vision_reasoner_reward(respond([at_29]), [gt]).accuracy == 3.0


def test_iou_uses_inclusive_areas() -> None:
    # GT [0,0,9,9] vs pred [5,0,14,9]: inter 5*10=50, union 100+100-50=150 -> 1/3
    # (exclusive areas would give 36/126 = 0.2857).
    value = iou_matrix(np.array([[5.0, 0, 14, 9]]), np.array([[0.0, 0, 9, 9]]))
    assert value.shape == (1, 1) and value[0, 0] == pytest.approx(1 / 3)
    # A zero-height line is a valid box: [0,0,3,0] vs [1,0,4,0]: inter 3*1, union 4+4-3 -> 0.6.
    assert iou_matrix(np.array([[1.0, 0, 4, 0]]), np.array([[0.0, 0, 3, 0]]))[0, 0] == pytest.approx(0.6)


# --- answer format --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "objects, expected",
    [
        ([A], 2.0),
        ([{"bbox_2d": [0, 0, 99, 99]}], 1.0),
        ([{"point_2d": [1, 2]}], 1.0),
        ([A, {"bbox_2d": [1, 2, 3]}], 1.0),  # (2 + 0) / 2
        ([A, {"bbox_2d": [99, 0, 0, 99], "point_2d": [1, 1]}], 1.5),  # inverted box: (2 + 1) / 2
        ([{"bbox_2d": ["0", 0, 99, 99], "point_2d": [1, 2, 3]}], 0.0),
        ([{}], 0.0),
    ],
)
def test_answer_format(objects: list, expected: float) -> None:
    assert vision_reasoner_reward(respond(objects), [A]).answer_format == expected


# --- multiple objects: Hungarian matching --------------------------------------------------------

def test_permuted_order_still_perfect() -> None:
    assert terms(vision_reasoner_reward(respond([B, A]), [A, B])) == (1.0, 2.0, 3.0, 1.0, 7.0)


def test_extra_prediction_divides_by_prediction_count() -> None:
    # A and B match perfectly (3 + 3); C matches nothing; 6 / max(3, 2) = 2.
    assert vision_reasoner_reward(respond([A, C, B]), [A, B]).accuracy == 2.0


def test_missing_prediction_divides_by_gt_count() -> None:
    # Only A is predicted: 3 / max(1, 2) = 1.5.
    assert vision_reasoner_reward(respond([A]), [B, A]).accuracy == 1.5


def test_hungarian_beats_greedy_assignment() -> None:
    gt_a = obj([0, 0, 99, 99], [50, 50])  # area 10000
    gt_b = obj([0, 0, 99, 79], [50, 40])  # area 8000
    p1 = obj([0, 0, 99, 99], [50, 50])
    p2 = obj([0, 10, 99, 109], [50, 60])  # area 10000
    # p1-A: identical -> 3.
    # p1-B: inter 8000, union 10000 -> IoU .8 (+1); L1 20/4=5 (+1); point 10 px (+1) -> 3.
    # p2-A: inter 100*90=9000, union 11000 -> .818 (+1); L1 (0+10+0+10)/4=5 (+1); point 10 px (+1) -> 3.
    # p2-B: inter 100*70=7000, union 11000 -> .636 (+1); L1 (0+10+0+30)/4=10 (+0); point 20 px (+1) -> 2.
    np.testing.assert_array_equal(pair_scores([p1, p2], [gt_a, gt_b]), [[3, 3], [3, 2]])
    # In-order matching would give (3 + 2) / 2 = 2.5; the optimal p1-B, p2-A gives 6 / 2 = 3.
    assert vision_reasoner_reward(respond([p1, p2]), [gt_a, gt_b]).accuracy == 3.0


def test_object_cap() -> None:
    # 120 copies of the single GT: one is matched (3), divided by max(120, 1) -> 0.025.
    at_cap = vision_reasoner_reward(respond([A] * MAX_OBJECTS), [A])
    assert at_cap.accuracy == pytest.approx(3 / 120)
    # One more than the cap: accuracy 0 (documented choice instead of truncation); format still 2.
    over = vision_reasoner_reward(respond([A] * (MAX_OBJECTS + 1)), [A])
    assert over.accuracy == 0.0 and over.answer_format == 2.0
    assert vision_reasoner_reward(respond([A] * 3), [A], max_objects=2).accuracy == 0.0


# --- no-object samples ------------------------------------------------------------------------------

def test_no_object_gt_and_empty_answer_is_full_marks() -> None:
    assert terms(vision_reasoner_reward(respond([]), [])) == (1.0, 2.0, 3.0, 1.0, 7.0)
    assert vision_reasoner_reward(respond([]), "[]").total == 7.0  # GT as JSON string


def test_no_object_gt_with_predicted_objects() -> None:
    assert terms(vision_reasoner_reward(respond([A]), [])) == (1.0, 2.0, 0.0, 1.0, 4.0)


def test_empty_answer_with_objects_in_gt() -> None:
    assert terms(vision_reasoner_reward(respond([]), [A])) == (1.0, 0.0, 0.0, 1.0, 2.0)


def test_no_object_gt_with_unparseable_answer() -> None:
    assert terms(vision_reasoner_reward("<think>hm.</think><answer>none</answer>", [])) == (1.0, 0.0, 0.0, 1.0, 2.0)


# --- the ViSurf GT row --------------------------------------------------------------------------------

@pytest.mark.parametrize("solution", [[A], [A, B], [], [B, C, A]])
def test_ground_truth_row_scores_at_most_six(solution: list) -> None:
    rendered_no_think = f"<answer>{json.dumps(solution)}</answer>"
    rendered_think = respond(solution, think="")
    for response in (rendered_no_think, rendered_think):
        breakdown = vision_reasoner_reward(response, solution, is_ground_truth=True)
        assert breakdown.thinking == 0.0
        assert terms(breakdown) == (0.0, 2.0, 3.0, 1.0, 6.0)
    # The same rendered text as a rollout keeps its thinking point.
    assert vision_reasoner_reward(rendered_think, solution).total == 7.0


# --- thinking and non-repeat -----------------------------------------------------------------------------

def test_thinking_term() -> None:
    answer = json.dumps([A])
    assert vision_reasoner_reward(f"<answer>{answer}</answer>", [A]).thinking == 0.0
    assert vision_reasoner_reward(f"<think>x</think> junk <answer>{answer}</answer>", [A]).thinking == 0.0
    assert vision_reasoner_reward(f"\n<think>x</think>\n<answer>{answer}</answer>\n", [A]).thinking == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog. A cat. A bird.", 1.0),
        ("A dog. A cat. A dog.", 1.0),  # one repeat is tolerated, as in the authors' code
        ("A dog. A cat. A dog. A cat.", 0.0),  # the second repeat zeroes it
        ("A dog. A dog. A dog.", 0.0),
        (" A dog .A dog. ..", 1.0),  # sentences are stripped; empty ones ignored
        ("", 1.0),
    ],
)
def test_non_repeat_reward(text: str, expected: float) -> None:
    assert non_repeat_reward(text) == expected


def test_non_repeat_reads_the_reasoning_not_the_answer() -> None:
    # Decimal coordinates split into "sentences" like "5" and "5, 1" that would repeat.
    objects = [obj([0.5, 0.5, 99.5, 99.5], [50.5, 50.5])] * 2
    response = respond(objects, think="Two boxes.")
    assert non_repeat_reward(response) == 0.0  # what checking the whole response would give
    assert vision_reasoner_reward(response, [A]).non_repeat == 1.0
    # Without a think block the whole response is checked: "Same" appears 3 times -> 2 repeats.
    repeated = "<answer>[]</answer>. Same. Same. Same."
    assert vision_reasoner_reward(repeated, []).non_repeat == 0.0


# --- degenerate predictions and GT validation -----------------------------------------------------------

def test_inverted_box_gets_no_box_or_point_credit() -> None:
    gt = obj([10, 10, 12, 12], [11, 11])
    # Swapped corners: mean L1 = (2+2+2+2)/4 = 2 < 10 would pay if the box were accepted.
    pred = obj([12, 12, 10, 10], [11, 11])
    breakdown = vision_reasoner_reward(respond([pred]), [gt])
    assert (breakdown.answer_format, breakdown.accuracy) == (1.0, 0.0)


def test_negative_coordinates_are_numbers_but_do_not_match() -> None:
    pred = obj([-50, -50, -1, -1], [-25, -25])
    breakdown = vision_reasoner_reward(respond([pred]), [A])
    assert (breakdown.answer_format, breakdown.accuracy) == (2.0, 0.0)


def test_negative_coordinates_match_a_negative_gt() -> None:
    gt = obj([-50, -50, -1, -1], [-25, -25])
    assert vision_reasoner_reward(respond([gt]), [gt]).total == 7.0


def test_missing_point_still_scores_box_terms() -> None:
    breakdown = vision_reasoner_reward(respond([{"bbox_2d": [0, 0, 99, 99]}]), [A])
    assert (breakdown.answer_format, breakdown.accuracy) == (1.0, 2.0)


@pytest.mark.parametrize(
    "solution",
    [
        None,
        {"bbox_2d": [0, 0, 1, 1], "point_2d": [0, 0]},
        [{"bbox_2d": [0, 0, 1, 1]}],  # no point
        [{"bbox_2d": [1, 0, 0, 1], "point_2d": [0, 0]}],  # inverted
        [{"bbox_2d": [0, 0, 1, float("nan")], "point_2d": [0, 0]}],
        "not json",
    ],
)
def test_malformed_solution_raises(solution: object) -> None:
    with pytest.raises(ValueError):
        vision_reasoner_reward(respond([A]), solution)
