"""Parse a policy response ``<think>…</think><answer>[…]</answer>`` without ever executing it.

Model output is hostile by default: during RL the policy will find any crash, hang or code path
that pays. So every step here is bounded and linear in the input:

* the whole response and the answer text have size caps checked before any work;
* the thinking-format check is a single linear scan, not a backtracking regex (the lazy
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` fullmatch is quadratic on tag soup);
* JSON nesting depth is measured with a flat scan before ``json.loads`` (recursion bombs);
* NaN/Infinity literals and overflowing floats are rejected by the decoder itself;
* nothing is passed to eval/exec/ast.literal_eval; the optional tolerant mode only rewrites text
  and still decodes with the strict JSON decoder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any

MAX_RESPONSE_CHARS = 1 << 20  # far above any generation length we sample; beyond it nothing is scored
MAX_ANSWER_CHARS = 1 << 16  # 64 KiB: a legitimate 120-object answer is ~6 KB
MAX_JSON_DEPTH = 16  # legitimate answers nest 3 deep (list > object > list)
DEFAULT_TIME_BUDGET_S = 1.0

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Only the ``</think>\s*<answer>`` junction uses a regex: it cannot backtrack beyond one whitespace run.
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")
# Escapes are consumed as pairs so an escaped quote never toggles the in-string state.
_JSON_STRUCTURE = re.compile(r'\\.|["\[\]{}]', re.DOTALL)
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_PY_LITERAL_RE = re.compile(r"\b(True|False|None)\b")
_TRAILING_COMMA_RE = re.compile(r",\s*([\]}])")


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """What could be read from one response; ``error`` says why ``objects`` is None."""

    think: str | None
    answer: str | None
    objects: list[dict[str, Any]] | None
    error: str | None
    thinking_format_ok: bool


def thinking_format_ok(text: str) -> bool:
    """Exactly ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text.strip(), re.DOTALL)``.

    The regex only needs *some* ``</think>\\s*<answer>`` junction after the opening tag whose
    ``<answer>`` ends before the final ``</answer>``; the leftmost junction is the best candidate,
    so one forward search decides it in linear time.
    """
    s = text.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    answer_body_end = len(s) - len(ANSWER_CLOSE)
    junction = _THINK_TO_ANSWER.search(s, len(THINK_OPEN))
    return junction is not None and junction.end() <= answer_body_end


def extract_answer(text: str) -> str | None:
    """Inner text of the last complete ``<answer>…</answer>`` pair, stripped.

    The last pair is the model's final word: earlier pairs are usually drafts inside the reasoning.
    """
    close = text.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    body_start = start + len(ANSWER_OPEN)
    return text[body_start : text.find(ANSWER_CLOSE, body_start)].strip()


def extract_think(text: str) -> str | None:
    """Text between the first ``<think>`` and the first ``</think>`` after it."""
    start = text.find(THINK_OPEN)
    if start < 0:
        return None
    body_start = start + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, body_start)
    return None if end < 0 else text[body_start:end]


def json_depth_within(text: str, max_depth: int) -> bool:
    """Whether bracket nesting outside JSON strings never exceeds ``max_depth``."""
    depth = 0
    in_string = False
    for match in _JSON_STRUCTURE.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            if depth > max_depth:
                return False
        else:
            depth -= 1
    return True


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite JSON constant {name}")


def _finite_float(literal: str) -> float:
    # ``1e999`` decodes to inf without ever reaching parse_constant.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"non-finite JSON number {literal[:32]}")
    return value


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity and overflowing numbers (raises ValueError)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _tolerant_rewrite(text: str) -> str:
    """Near-JSON -> JSON by plain text rewriting (code fences, quotes, Python literals, trailing commas).

    Plain string operations for the fences: a ``\\s*(.*?)\\s*`` regex would be quadratic on whitespace.
    """
    s = text.strip()
    if s.startswith("```"):
        s = s[3:]
        if s.startswith("json"):
            s = s[4:]
        if s.endswith("```"):
            s = s[:-3]
        s = s.strip()
    if '"' not in s:
        s = s.replace("'", '"')
    s = _PY_LITERAL_RE.sub(lambda m: _PY_LITERALS[m.group(1)], s)
    return _TRAILING_COMMA_RE.sub(r"\1", s)


def decode_answer(
    answer: str, *, max_depth: int = MAX_JSON_DEPTH, tolerant: bool = False
) -> tuple[Any, str | None]:
    """(value, None) for a decodable answer, else (None, reason)."""
    if not json_depth_within(answer, max_depth):
        return None, f"answer nests deeper than {max_depth}"
    try:
        return loads_strict(answer), None
    except (ValueError, RecursionError) as exc:
        strict_error = f"answer is not JSON: {str(exc)[:80]}"
    if not tolerant:
        return None, strict_error
    rewritten = _tolerant_rewrite(answer)
    if not json_depth_within(rewritten, max_depth):
        return None, f"answer nests deeper than {max_depth}"
    try:
        return loads_strict(rewritten), None
    except (ValueError, RecursionError):
        return None, strict_error


def parse_response(
    text: Any,
    *,
    max_chars: int = MAX_RESPONSE_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    max_depth: int = MAX_JSON_DEPTH,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    tolerant: bool = False,
) -> ParsedResponse:
    """Read think text, answer text and the answer's object list from one response.

    ``tolerant`` is off by default because the authors' reward decodes with plain ``json.loads``:
    paying for near-JSON would teach output that strict consumers (evaluation, SAM prompting) reject.

    The size caps make every step bounded; ``time_budget_s`` is only a backstop checked between
    steps (Python cannot interrupt ``json.loads``), so in practice it never decides a reward.
    """
    if not isinstance(text, str):
        return ParsedResponse(None, None, None, "response is not a string", False)
    if len(text) > max_chars:
        return ParsedResponse(None, None, None, f"response too long (> {max_chars} chars)", False)
    started = time.perf_counter()
    format_ok = thinking_format_ok(text)
    think = extract_think(text)
    answer = extract_answer(text)
    if answer is None:
        return ParsedResponse(think, None, None, "no <answer>...</answer>", format_ok)
    if len(answer) > max_answer_chars:
        return ParsedResponse(think, None, None, f"answer too long (> {max_answer_chars} chars)", format_ok)
    value, error = decode_answer(answer, max_depth=max_depth, tolerant=tolerant)
    if error is None and time.perf_counter() - started > time_budget_s:
        error = f"time budget exceeded ({time_budget_s} s)"
    if error is not None:
        return ParsedResponse(think, answer, None, error, format_ok)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        return ParsedResponse(think, answer, None, "answer is not a JSON list of objects", format_ok)
    return ParsedResponse(think, answer, value, None, format_ok)


def finite_number(value: Any) -> float | None:
    """The value as a finite float, or None (bool is not a number; huge ints overflow to None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def coordinates(value: Any, length: int) -> tuple[float, ...] | None:
    """A list of exactly ``length`` finite numbers as floats, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        return None
    numbers = tuple(finite_number(item) for item in value)
    return None if any(number is None for number in numbers) else numbers


def object_box(obj: Any) -> tuple[float, float, float, float] | None:
    """The object's ``bbox_2d`` if it is 4 finite numbers with x1 <= x2 and y1 <= y2."""
    if not isinstance(obj, dict):
        return None
    box = coordinates(obj.get("bbox_2d"), 4)
    if box is None or box[2] < box[0] or box[3] < box[1]:
        return None
    return box  # type: ignore[return-value]


def object_point(obj: Any) -> tuple[float, float] | None:
    """The object's ``point_2d`` if it is 2 finite numbers."""
    if not isinstance(obj, dict):
        return None
    return coordinates(obj.get("point_2d"), 2)  # type: ignore[return-value]
