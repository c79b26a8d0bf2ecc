"""Hostile model output: every case returns a finite reward, never runs code, and takes < 1 s.

The bound: each reward call below is timed with time.perf_counter and must finish in under
BOUND_S = 1.0 second (the size caps make the real cost a few tens of milliseconds).
Expected breakdowns are exact: the affected terms are 0, the unaffected ones keep their value.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from visurf_megatron.rewards.anomaly import anomaly_reward
from visurf_megatron.rewards.grounding import vision_reasoner_reward
from visurf_megatron.rewards.gui import gui_reward
from visurf_megatron.rewards.math import math_reward
from visurf_megatron.rewards.parsing import parse_response
from visurf_megatron.rewards.types import RewardBreakdown

BOUND_S = 1.0
PWNED = Path(tempfile.gettempdir()) / f"visurf_pwned_{uuid.uuid4().hex}"
INJECT = f"__import__('os').system('touch {PWNED}')"
TEN_MB = 10 * 1024 * 1024

A = {"bbox_2d": [0, 0, 99, 99], "point_2d": [50, 50]}
GT = [A]
A_JSON = json.dumps(A)


def think(answer: str) -> str:
    return f"<think>x</think><answer>{answer}</answer>"


def one(box: Any, point: Any) -> str:
    return think(json.dumps([{"bbox_2d": box, "point_2d": point}]))


def timed(fn: Callable[..., RewardBreakdown], *args: Any, **kwargs: Any) -> RewardBreakdown:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND_S, f"{fn.__name__} took {elapsed:.3f} s (bound {BOUND_S} s)"
    assert isinstance(result, RewardBreakdown)
    assert all(math.isfinite(v) for v in result.as_dict().values())
    assert not PWNED.exists(), "model output was executed"
    return result


@pytest.fixture(scope="module", autouse=True)
def warm_math_verify() -> None:
    # First use compiles math-verify's regexes and grammar; that one-off cost is not per response.
    math_reward(think(r"\boxed{1/2}"), "0.5")
    math_reward(think("B"), "5", choices=["3", "5"])


def terms(b: RewardBreakdown) -> tuple[float, float, float, float]:
    return b.thinking, b.answer_format, b.accuracy, b.non_repeat


# (name, response, expected (thinking, answer_format, accuracy, non_repeat)) against GT [A].
GROUNDING_CASES: list[tuple[str, Any, tuple[float, float, float, float]]] = [
    ("injection as answer", think(INJECT), (1, 0, 0, 1)),
    ("injection as box", think(json.dumps([{"bbox_2d": INJECT, "point_2d": [50, 50]}])), (1, 1, 0, 1)),
    ("python lambda", think(f"[{{'bbox_2d': (lambda: {INJECT})()}}]"), (1, 0, 0, 1)),
    ("python literal list", think("[{'bbox_2d': [0, 0, 99, 99], 'point_2d': [50, 50]}]"), (1, 0, 0, 1)),
    ("10 MB object list", think("[" + ",".join([A_JSON] * (TEN_MB // len(A_JSON))) + "]"), (0, 0, 0, 0)),
    ("10 MB of [", "<answer>" + "[" * TEN_MB + "</answer>", (0, 0, 0, 0)),
    ("100000 nested [", think("[" * 100_000 + "]" * 100_000), (1, 0, 0, 1)),
    ("10000 nested [", think("[" * 10_000 + "]" * 10_000), (1, 0, 0, 1)),
    ("10000 nested objects", think('{"a":' * 10_000 + "1" + "}" * 10_000), (1, 0, 0, 1)),
    ("unclosed nesting", think("[" * 50_000), (1, 0, 0, 1)),
    ("1e308", one([0, 0, 1e308, 1e308], [1e308, 1e308]), (1, 2, 0, 1)),
    ("-1e308", one([-1e308, -1e308, 1e308, 1e308], [-1e308, 1e308]), (1, 2, 0, 1)),
    ("1e999", think('[{"bbox_2d": [0, 0, 1e999, 99], "point_2d": [50, 50]}]'), (1, 0, 0, 1)),
    ("NaN", think('[{"bbox_2d": [NaN, 0, 99, 99], "point_2d": [50, 50]}]'), (1, 0, 0, 1)),
    ("Infinity", think('[{"bbox_2d": [0, 0, Infinity, 99], "point_2d": [50, 50]}]'), (1, 0, 0, 1)),
    ("-Infinity", think('[{"bbox_2d": [-Infinity, 0, 99, 99], "point_2d": [50, 50]}]'), (1, 0, 0, 1)),
    ("5000-digit int", think('[{"bbox_2d": [' + "9" * 5000 + ", 0, 99, 99]}]"), (1, 0, 0, 1)),
    ("4000-digit int", think('[{"bbox_2d": [' + "9" * 4000 + ', 0, 99, 99], "point_2d": [50, 50]}]'), (1, 1, 0, 1)),
    ("negative coordinates", one([-99, -99, -1, -1], [-50, -50]), (1, 2, 0, 1)),
    ("x2 < x1", one([99, 0, 0, 99], [50, 50]), (1, 1, 0, 1)),
    ("y2 < y1", one([0, 99, 99, 0], [50, 50]), (1, 1, 0, 1)),
    ("missing tags", json.dumps(GT), (0, 0, 0, 1)),
    ("missing </answer>", f"<think>x</think><answer>{json.dumps(GT)}", (0, 0, 0, 1)),
    ("missing </think>", f"<think>x<answer>{json.dumps(GT)}</answer>", (0, 2, 3, 1)),
    ("empty response", "", (0, 0, 0, 1)),
    ("full-width digits", think('[{"bbox_2d": [０, ０, ９９, ９９], "point_2d": [５０, ５０]}]'), (1, 0, 0, 1)),
    ("unicode reasoning", f"<think>看图。🙂\u202e\u0000</think><answer>{json.dumps(GT)}</answer>", (1, 2, 3, 1)),
    ("lone surrogate", f"<think>\ud800</think><answer>[{A_JSON[:-1]}, \"\\ud800\": 1}}]</answer>", (1, 2, 3, 1)),
    ("strings for numbers", one(["0", "0", "99", "99"], ["50", "50"]), (1, 0, 0, 1)),
    ("booleans", one([True, False, True, True], [True, True]), (1, 0, 0, 1)),
    ("nulls", one([None, 0, 99, 99], None), (1, 0, 0, 1)),
    ("nested lists", one([[0], [0], [99], [99]], [[50], [50]]), (1, 0, 0, 1)),
    ("too few numbers", one([0, 0, 99], [50]), (1, 0, 0, 1)),
    ("object not list", think(A_JSON), (1, 0, 0, 1)),
    ("list of numbers", think("[0, 0, 99, 99]"), (1, 0, 0, 1)),
    ("1000 objects", think(json.dumps([A] * 1000)), (1, 2, 0, 1)),
    ("tag soup", "<think>" + "</think><answer></answer>x" * 35_000, (0, 0, 0, 1)),
    ("quote storm", think('["' + '\\"' * 30_000 + '"]'), (1, 0, 0, 1)),
    ("repeated reasoning", "<think>" + "same. " * 150_000 + f"</think><answer>{json.dumps(GT)}</answer>", (1, 2, 3, 0)),
    ("whitespace storm", "<think>x</think>" + " " * 900_000 + f"<answer>{json.dumps(GT)}</answer>", (1, 2, 3, 1)),
    ("junction storm", "<think>" + "</think>" + " " * 1000 + "x" * 900 + f"</think><answer>{json.dumps(GT)}</answer>", (1, 2, 3, 1)),
    ("None response", None, (0, 0, 0, 0)),
    ("bytes response", think(json.dumps(GT)).encode(), (0, 0, 0, 0)),
    ("int response", 7, (0, 0, 0, 0)),
]


@pytest.mark.parametrize("name, response, expected", GROUNDING_CASES, ids=[c[0] for c in GROUNDING_CASES])
def test_grounding_hostile(name: str, response: Any, expected: tuple[float, ...]) -> None:
    assert terms(timed(vision_reasoner_reward, response, GT)) == expected


def test_parse_hostile_never_raises_and_is_bounded() -> None:
    for name, response, _ in GROUNDING_CASES:
        start = time.perf_counter()
        parsed = parse_response(response)
        assert time.perf_counter() - start < BOUND_S, name
        assert parsed.objects is None or isinstance(parsed.objects, list), name


def test_hungarian_at_the_object_cap_is_bounded() -> None:
    gt = [{"bbox_2d": [i, i, i + 10, i + 10], "point_2d": [i + 5, i + 5]} for i in range(0, 1200, 10)]
    pred = list(reversed(gt))
    assert terms(timed(vision_reasoner_reward, think(json.dumps(pred)), gt)) == (1, 2, 3, 1)


GUI_BOX = [0, 0, 99, 99]
GUI_CASES: list[tuple[str, Any, float]] = [
    ("injection", think(INJECT), 0.0),
    ("10 MB", think("[" + ",".join([A_JSON] * (TEN_MB // len(A_JSON))) + "]"), 0.0),
    ("NaN point", think('[{"point_2d": [NaN, 50]}]'), 0.0),
    ("1e308 point", think('[{"point_2d": [1e308, 50]}]'), 0.0),
    ("1e308 box centre", think('[{"bbox_2d": [-1e308, 0, 1e308, 99]}]'), 1.0),  # centre (0, 49.5) is inside
    ("boolean point", think('[{"point_2d": [true, true]}]'), 0.0),
    ("string point", think('[{"point_2d": ["50", "50"]}]'), 0.0),
    ("10000 nested [", think("[" * 10_000), 0.0),
    ("1000 points", think(json.dumps([{"point_2d": [50, 50]}] * 1000)), 0.0),  # over the object cap
    ("None", None, 0.0),
]


@pytest.mark.parametrize("name, response, accuracy", GUI_CASES, ids=[c[0] for c in GUI_CASES])
def test_gui_hostile(name: str, response: Any, accuracy: float) -> None:
    assert timed(gui_reward, response, GUI_BOX).accuracy == accuracy


ANOMALY_CASES: list[tuple[str, Any]] = [
    ("injection", think(f"{INJECT} yes")),
    ("10 MB", think("no " * (TEN_MB // 3))),
    ("full-width yes", think("ｙｅｓ")),
    ("yes without tags", "yes"),
    ("10 MB of x before yes", think("x" * TEN_MB + " yes")),
    ("None", None),
]


@pytest.mark.parametrize("name, response", ANOMALY_CASES, ids=[c[0] for c in ANOMALY_CASES])
def test_anomaly_hostile(name: str, response: Any) -> None:
    assert timed(anomaly_reward, response, "yes").accuracy == 0.0


MATH_CASES: list[tuple[str, Any]] = [
    ("injection boxed", think(r"\boxed{" + INJECT + "}")),
    ("injection plain", think(INJECT)),
    ("10 MB boxed", think(r"\boxed{" + "1" * TEN_MB + "}")),
    ("1 MB unbalanced boxed", r"\boxed{" + "{" * 1_000_000),
    ("100k boxed openers", think(r"\boxed{" * 100_000)),
    ("power tower", think(r"\boxed{9^{9^{9^{9}}}}")),
    ("big exponent", think(r"\boxed{99999^{99999999}}")),
    ("big factorial", think(r"\boxed{(10^{10})!}")),
    ("deep braces", think(r"\boxed{" + "{" * 200 + "1" + "}" * 200 + "}")),
    ("deep parens", think(r"\boxed{" + "(" * 100 + "1" + ")" * 100 + "}")),
    ("long digits", think(r"\boxed{" + "9" * 250 + "}")),
    ("NaN", think(r"\boxed{NaN}")),
    ("Infinity", think(r"\boxed{\infty}")),
    ("unicode", think(r"\boxed{答案}")),
    ("None", None),
]


@pytest.mark.parametrize("name, response", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_hostile(name: str, response: Any) -> None:
    assert timed(math_reward, response, "0.5").accuracy == 0.0


def test_math_hostile_multiple_choice() -> None:
    for response in (think(INJECT), think("(" * 10_000), think("Z"), think("B" * 1000)):
        assert timed(math_reward, response, "B", choices=["1", "2"]).accuracy == 0.0
