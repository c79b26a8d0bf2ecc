"""Response parsing: tag extraction, the thinking-format check, strict JSON and coordinate coercion."""
from __future__ import annotations

import random
import re

import pytest

from visurf_megatron.rewards.parsing import (
    MAX_ANSWER_CHARS,
    MAX_JSON_DEPTH,
    coordinates,
    decode_answer,
    extract_answer,
    extract_think,
    finite_number,
    json_depth_within,
    object_box,
    object_point,
    parse_response,
    thinking_format_ok,
)

AUTHORS_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
OBJ = '{"bbox_2d": [10, 20, 110, 220], "point_2d": [60, 120]}'


# --- thinking format -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        (f"<think>reason</think><answer>[{OBJ}]</answer>", True),
        ("<think></think><answer></answer>", True),  # both bodies may be empty
        ("  \n<think>a</think>\n\n <answer>[]</answer>\n", True),  # outer whitespace is stripped
        ("<think>a</think>\u3000<answer>[]</answer>", True),  # \s is Unicode-aware, as in the regex
        ("<think>a</think>x<answer>[]</answer>", False),  # only whitespace between the blocks
        ("pre<think>a</think><answer>[]</answer>", False),
        ("<think>a</think><answer>[]</answer>post", False),
        ("<answer>[]</answer>", False),  # the no-think form earns no thinking reward
        ("<think>a<answer>[]</answer>", False),
        ("<think>a</think><answer>[]", False),
        ("<think>a</think></answer>", False),
        ("<think>a</think><answer></answer></think><answer>b</answer>", True),  # lazy .*? spans tags
        ("<think></answer>", False),
        ("", False),
    ],
)
def test_thinking_format_cases(text: str, expected: bool) -> None:
    assert thinking_format_ok(text) is expected
    assert bool(AUTHORS_PATTERN.fullmatch(text.strip())) is expected


def test_thinking_format_equals_authors_regex_on_random_tag_soup() -> None:
    # The linear check must agree with the authors' regex everywhere, not only on the cases above.
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "<", ">", "/", "think", "answer"]
    rng = random.Random(1234)
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert thinking_format_ok(text) == bool(AUTHORS_PATTERN.fullmatch(text.strip())), repr(text)


# --- tag extraction --------------------------------------------------------------------------

def test_extract_answer_takes_the_last_complete_pair() -> None:
    assert extract_answer("<answer> a </answer> then <answer>b</answer>") == "b"
    assert extract_answer("<answer>a</answer><answer>unclosed") == "a"
    assert extract_answer("<answer>x<answer>y</answer>") == "y"
    assert extract_answer("no tags") is None
    assert extract_answer("</answer><answer>") is None


def test_extract_think() -> None:
    assert extract_think("<think> r. </think><answer>[]</answer>") == " r. "
    assert extract_think("<answer>[]</answer>") is None
    assert extract_think("<think>never closed") is None


# --- parse_response ----------------------------------------------------------------------------

def test_parse_full_response() -> None:
    parsed = parse_response(f"<think>two things.</think>\n<answer>[{OBJ}, {OBJ}]</answer>")
    assert parsed.thinking_format_ok
    assert parsed.error is None
    assert parsed.think == "two things."
    assert parsed.objects == [{"bbox_2d": [10, 20, 110, 220], "point_2d": [60, 120]}] * 2


def test_parse_no_think_form_and_empty_list() -> None:
    parsed = parse_response("<answer>[]</answer>")
    assert parsed.objects == [] and parsed.error is None
    assert not parsed.thinking_format_ok and parsed.think is None


def test_parse_uses_last_answer() -> None:
    parsed = parse_response(f"<think>draft <answer>[]</answer> no.</think><answer>[{OBJ}]</answer>")
    assert parsed.objects is not None and len(parsed.objects) == 1


@pytest.mark.parametrize(
    "answer, error_fragment",
    [
        ('{"bbox_2d": [1, 2, 3, 4]}', "not a JSON list of objects"),
        ("[1, 2]", "not a JSON list of objects"),
        ("[[1, 2, 3, 4]]", "not a JSON list of objects"),
        ('[{"bbox_2d": [NaN, 1, 2, 3]}]', "not JSON"),
        ('[{"bbox_2d": [Infinity, 1, 2, 3]}]', "not JSON"),
        ('[{"bbox_2d": [-Infinity, 1, 2, 3]}]', "not JSON"),
        ('[{"bbox_2d": [1e999, 1, 2, 3]}]', "not JSON"),  # overflows to inf inside the decoder
        ("[{'bbox_2d': [1, 2, 3, 4]}]", "not JSON"),  # strict by default
        ("", "not JSON"),
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nests deeper"),
    ],
)
def test_parse_errors(answer: str, error_fragment: str) -> None:
    parsed = parse_response(f"<think>t</think><answer>{answer}</answer>")
    assert parsed.objects is None
    assert error_fragment in parsed.error
    assert parsed.thinking_format_ok  # the tags are right even when the JSON is not


def test_parse_missing_tags_and_non_string() -> None:
    assert parse_response(f"[{OBJ}]").error == "no <answer>...</answer>"
    for value in (None, b"<answer>[]</answer>", 7, ["<answer>[]</answer>"]):
        parsed = parse_response(value)
        assert parsed.error == "response is not a string" and parsed.objects is None


def test_size_caps() -> None:
    long_answer = "<answer>[" + " " * MAX_ANSWER_CHARS + "]</answer>"
    assert "answer too long" in parse_response(long_answer).error
    assert "response too long" in parse_response("<answer>[]</answer>" + "x" * 100, max_chars=50).error
    # Exactly at the cap is still parsed.
    at_cap = "[" + " " * (MAX_ANSWER_CHARS - 2) + "]"
    assert parse_response(f"<answer>{at_cap}</answer>").objects == []


def test_depth_bound_is_exact() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth_within(ok, MAX_JSON_DEPTH)
    assert not json_depth_within("[" + ok + "]", MAX_JSON_DEPTH)


def test_depth_scan_ignores_brackets_inside_strings() -> None:
    inside = '["' + "[" * 100 + '"]'
    assert json_depth_within(inside, 2)
    escaped = r'["\"' + "[" * 100 + '"]'  # the escaped quote must not close the string
    assert json_depth_within(escaped, 2)
    assert not json_depth_within(r'["\\"' + "[" * 100, 2)  # an escaped backslash does close it


def test_tolerant_mode_is_opt_in_and_never_executes() -> None:
    near_json = "```json\n[{'bbox_2d': [1, 2, 3, 4], 'point_2d': [2, 3], 'ok': True, 'n': None},]\n```"
    assert decode_answer(near_json)[0] is None
    value, error = decode_answer(near_json, tolerant=True)
    assert error is None
    assert value == [{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "ok": True, "n": None}]
    parsed = parse_response(f"<answer>{near_json}</answer>", tolerant=True)
    assert parsed.objects is not None and parsed.error is None
    # Python syntax that is not JSON-shaped stays undecodable even in tolerant mode.
    assert decode_answer("[__import__('os').getcwd()]", tolerant=True)[0] is None
    assert decode_answer("[1 + 1]", tolerant=True)[0] is None


# --- coordinates ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value, expected",
    [
        (3, 3.0),
        (-2.5, -2.5),
        (1e308, 1e308),
        (True, None),
        (False, None),
        ("3", None),
        (None, None),
        (float("nan"), None),
        (float("inf"), None),
        (10**400, None),  # finite int, but no float holds it
        ([1], None),
    ],
)
def test_finite_number(value: object, expected: float | None) -> None:
    assert finite_number(value) == expected


def test_coordinates_and_objects() -> None:
    assert coordinates([1, 2, 3, 4], 4) == (1.0, 2.0, 3.0, 4.0)
    assert coordinates([1, 2, 3], 4) is None
    assert coordinates([1, 2, 3, 4, 5], 4) is None
    assert coordinates("1234", 4) is None
    assert coordinates([1, 2, "3", 4], 4) is None
    assert object_box({"bbox_2d": [5, 5, 5, 5]}) == (5.0, 5.0, 5.0, 5.0)  # a one-pixel box is a box
    assert object_box({"bbox_2d": [6, 5, 5, 9]}) is None  # x2 < x1
    assert object_box({"bbox_2d": [5, 9, 6, 5]}) is None  # y2 < y1
    assert object_box({"bbox": [1, 2, 3, 4]}) is None
    assert object_box([1, 2, 3, 4]) is None
    assert object_point({"point_2d": [-4, 7]}) == (-4.0, 7.0)
    assert object_point({"point_2d": [1, 2, 3]}) is None
    assert object_point({"point_2d": [True, 2]}) is None
