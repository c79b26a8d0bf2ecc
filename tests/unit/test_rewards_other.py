"""Math, GUI and anomaly rewards, the task registry and the RewardBreakdown record."""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from visurf_megatron.rewards.anomaly import anomaly_reward
from visurf_megatron.rewards.gui import gui_reward
from visurf_megatron.rewards.math import (
    choice_letter,
    extract_boxed,
    extract_prediction,
    math_reward,
    too_expensive,
)
from visurf_megatron.rewards.registry import get_reward_fn, known_tasks
from visurf_megatron.rewards.types import RewardBreakdown


def tagged(answer: str, think: str = "Let me work it out.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# --- RewardBreakdown ---------------------------------------------------------------------------------

def test_breakdown_total_and_dict() -> None:
    breakdown = RewardBreakdown(thinking=1, answer_format=1.5, accuracy=2, non_repeat=1)
    assert breakdown.total == 5.5
    assert breakdown.as_dict() == {
        "thinking": 1.0, "answer_format": 1.5, "accuracy": 2.0, "non_repeat": 1.0, "total": 5.5,
    }
    assert breakdown.without_thinking().total == 4.5
    assert RewardBreakdown().total == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        breakdown.total = 7.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        RewardBreakdown(total=3.0)  # type: ignore[call-arg]  # total is derived, never passed
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError):
            RewardBreakdown(accuracy=bad)  # type: ignore[arg-type]


# --- math ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "response, gold, accuracy",
    [
        (tagged(r"\boxed{1/2}"), "0.5", 1.0),
        (tagged(r"\boxed{\frac{1}{2}}"), "0.5", 1.0),
        (tagged(r"The result is \boxed{0.5}."), "1/2", 1.0),
        (tagged("0.5"), r"\frac{1}{2}", 1.0),  # no \boxed: the answer text itself
        (tagged(r"\boxed{0.6}"), "0.5", 0.0),  # wrong answer
        (tagged(r"\boxed{12}"), 12, 1.0),  # numeric gold
        (r"So \boxed{3}, no wait, \boxed{0.5}", "0.5", 1.0),  # last \boxed, no tags needed
        (tagged(r"\boxed{3} then \boxed{4}"), "4", 1.0),
        ("The answer is 0.5", "0.5", 0.0),  # neither \boxed nor <answer>: nothing to grade
        (tagged(""), "0.5", 0.0),
        (tagged(r"\boxed{0.5"), "0.5", 0.0),  # unbalanced: the raw text is not an expression
    ],
)
def test_math_free_form(response: str, gold: object, accuracy: float) -> None:
    assert math_reward(response, gold).accuracy == accuracy


def test_math_breakdown_terms() -> None:
    good = math_reward(tagged(r"\boxed{1/2}"), "0.5")
    assert good.as_dict() == {"thinking": 1.0, "answer_format": 0.0, "accuracy": 1.0, "non_repeat": 0.0, "total": 2.0}
    assert math_reward(tagged(r"\boxed{1/2}"), "0.5", is_ground_truth=True).total == 1.0
    assert math_reward(r"<answer>\boxed{1/2}</answer>", "0.5").total == 1.0  # no-think form


CHOICES = ["3", "5", "7"]


@pytest.mark.parametrize(
    "prediction, accuracy",
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("B) 5", 1.0),
        ("b", 1.0),
        ("Option B", 1.0),
        (r"\boxed{B}", 1.0),
        (r"\boxed{\text{B}}", 1.0),
        ("5", 1.0),  # the option text itself
        (r"\boxed{10/2}", 1.0),  # an equal value of the option text
        ("C", 0.0),
        ("(A)", 0.0),
        ("D", 0.0),  # no fourth option
        ("7", 0.0),
        ("", 0.0),
    ],
)
def test_math_multiple_choice(prediction: str, accuracy: float) -> None:
    assert math_reward(tagged(prediction), "5", choices=CHOICES).accuracy == accuracy
    # The gold may also be given as the letter.
    assert math_reward(tagged(prediction), "B", choices=CHOICES).accuracy == accuracy


def test_option_text_wins_over_a_leading_letter() -> None:
    choices = ["A cat", "A dog"]
    assert math_reward(tagged("A dog"), "A dog", choices=choices).accuracy == 1.0
    assert math_reward(tagged("a cat"), "B", choices=choices).accuracy == 0.0


def test_lettered_gold_without_choices() -> None:
    assert math_reward(tagged("(C)"), "C").accuracy == 1.0
    assert math_reward(tagged("D"), "C").accuracy == 0.0


def test_choice_letter() -> None:
    assert choice_letter("(D)") == "D"
    assert choice_letter("A cat") == "A"  # uppercase letter then a space reads as a letter
    assert choice_letter("a cat") is None  # lowercase only alone
    assert choice_letter("Both") is None
    assert choice_letter("42") is None


def test_extract_boxed_and_prediction() -> None:
    assert extract_boxed(r"x \boxed{\frac{1}{\sqrt{2}}} y") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\boxed{1} \boxed{2}") == "2"
    assert extract_boxed(r"\boxed{{1}") is None
    assert extract_boxed(r"\boxed{" + "1" * 10 + "}", max_chars=5) is None
    assert extract_prediction(r"<think>\boxed{1}</think><answer>2</answer>") == "2"  # answer region first
    assert extract_prediction("no answer") is None


@pytest.mark.parametrize(
    "expr, expensive",
    [
        ("x^2 + y^2", False),
        ("2^{10}", False),
        (r"\frac{1}{2}", False),
        ("5!", False),
        ("9^{9^{9}}", True),
        ("9^9^9", True),
        ("9^{9}^{9}", True),
        ("99999^{99999999}", True),
        ("2^(1000)", True),
        ("10000!", True),
        ("(10^{10})!", True),
        ("{" * 9 + "}" * 9, True),
        ("1" * 300, True),
    ],
)
def test_too_expensive(expr: str, expensive: bool) -> None:
    assert too_expensive(expr) is expensive


def test_math_works_off_the_main_thread() -> None:
    # math-verify's signal timeout raises outside the main thread; the reward must not.
    results: list[RewardBreakdown] = []
    worker = threading.Thread(target=lambda: results.append(math_reward(tagged(r"\boxed{1/2}"), "0.5")))
    worker.start()
    worker.join(timeout=30)
    assert [r.accuracy for r in results] == [1.0]


# --- GUI ---------------------------------------------------------------------------------------------------

GUI_BOX = [100, 200, 300, 260]


@pytest.mark.parametrize(
    "objects, accuracy, answer_format",
    [
        ([{"bbox_2d": [110, 210, 290, 250], "point_2d": [200, 230]}], 1.0, 2.0),
        ([{"point_2d": [300, 260]}], 1.0, 1.0),  # corners are inside (inclusive)
        ([{"point_2d": [301, 230]}], 0.0, 1.0),
        ([{"bbox_2d": [150, 210, 250, 250]}], 1.0, 1.0),  # box centre (200, 230) clicks
        ([{"bbox_2d": [0, 0, 50, 50], "point_2d": [200, 230]}], 1.0, 2.0),  # the point wins over the box
        ([{"bbox_2d": [150, 210, 250, 250], "point_2d": "x"}], 1.0, 1.0),  # bad point -> box centre
        ([{"point_2d": [0, 0]}, {"point_2d": [150, 250]}], 1.0, 1.0),  # any point inside
        ([{"bbox_2d": [250, 250, 150, 210]}], 0.0, 0.0),  # inverted box has no centre
        ([], 0.0, 0.0),
    ],
)
def test_gui_accuracy_and_format(objects: list, accuracy: float, answer_format: float) -> None:
    breakdown = gui_reward(tagged(json.dumps(objects)), GUI_BOX)
    assert (breakdown.accuracy, breakdown.answer_format) == (accuracy, answer_format)


def test_gui_totals_and_solution_shapes() -> None:
    response = tagged(json.dumps([{"bbox_2d": [110, 210, 290, 250], "point_2d": [200, 230]}]))
    for solution in (GUI_BOX, {"bbox_2d": GUI_BOX}, [{"bbox_2d": GUI_BOX}], json.dumps(GUI_BOX)):
        assert gui_reward(response, solution).total == 5.0
    assert gui_reward(response, GUI_BOX, is_ground_truth=True).total == 4.0
    with pytest.raises(ValueError):
        gui_reward(response, [300, 200, 100, 260])


# --- anomaly ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "answer, gold, accuracy",
    [
        ("Yes.", "yes", 1.0),
        ("YES, there is a scratch", "Yes", 1.0),
        ("no", "No", 1.0),
        ("no", "yes", 0.0),
        ("yesterday", "yes", 0.0),  # the first word, not a prefix
        ("", "no", 0.0),
    ],
)
def test_anomaly(answer: str, gold: str, accuracy: float) -> None:
    breakdown = anomaly_reward(tagged(answer), gold)
    assert (breakdown.thinking, breakdown.accuracy) == (1.0, accuracy)
    assert breakdown.answer_format == breakdown.non_repeat == 0.0


def test_anomaly_object_list_answers_read_as_a_verdict() -> None:
    # The anomaly prompt asks for boxes: a non-empty list says "yes", [] says "no".
    boxes = json.dumps([{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}])
    assert anomaly_reward(tagged(boxes), "yes").accuracy == 1.0
    assert anomaly_reward(tagged(boxes), "no").accuracy == 0.0
    assert anomaly_reward(tagged("[]"), "no").accuracy == 1.0
    assert anomaly_reward(tagged("[]"), True).accuracy == 0.0  # a bool label is yes/no too


def test_anomaly_with_object_gt_is_the_grounding_reward() -> None:
    gt = [{"bbox_2d": [0, 0, 99, 99], "point_2d": [50, 50]}]
    response = tagged(json.dumps(gt))
    assert anomaly_reward(response, gt) == RewardBreakdown(thinking=1, answer_format=2, accuracy=3, non_repeat=1)
    assert anomaly_reward(tagged("[]"), []).total == 7.0  # normal image, nothing found
    assert anomaly_reward(response, json.dumps(gt), is_ground_truth=True).total == 6.0


def test_anomaly_needs_answer_tags_and_a_valid_gold() -> None:
    assert anomaly_reward("yes", "yes").accuracy == 0.0
    for bad in ("maybe", "", None, 1):
        with pytest.raises(ValueError):
            anomaly_reward(tagged("yes"), bad)


# --- registry --------------------------------------------------------------------------------------------

def test_registry_knows_the_five_tasks() -> None:
    assert known_tasks() == ("anomaly", "existence", "grounding", "gui", "math")


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="anomaly, existence, grounding, gui, math"):
        get_reward_fn("segmentation")
    with pytest.raises(ValueError):
        get_reward_fn(["grounding"])  # type: ignore[arg-type]


GROUNDING_OBJ = {"bbox_2d": [0, 0, 99, 99], "point_2d": [50, 50]}
PER_TASK = {
    "grounding": (tagged(json.dumps([GROUNDING_OBJ])), [GROUNDING_OBJ], 7.0),
    "gui": (tagged(json.dumps([GROUNDING_OBJ])), [0, 0, 99, 99], 5.0),
    "anomaly": (tagged("yes"), "yes", 2.0),
    "math": (tagged("(B)"), {"answer": "5", "choices": CHOICES}, 2.0),
}


@pytest.mark.parametrize("task", sorted(PER_TASK))
def test_uniform_signature_and_gt_zeroes_thinking(task: str) -> None:
    fn = get_reward_fn(task)
    response, solution, best = PER_TASK[task]
    rollout = fn(response, solution)
    ground_truth = fn(response, solution, is_ground_truth=True)
    assert isinstance(rollout, RewardBreakdown)
    assert rollout.total == best and rollout.thinking == 1.0
    assert ground_truth.thinking == 0.0
    assert ground_truth.total == best - 1.0
    assert set(rollout.as_dict()) == {"thinking", "answer_format", "accuracy", "non_repeat", "total"}


def test_math_registry_accepts_a_plain_answer() -> None:
    assert get_reward_fn("math")(tagged(r"\boxed{1/2}"), "0.5").accuracy == 1.0
