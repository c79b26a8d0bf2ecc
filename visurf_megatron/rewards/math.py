"""Math / MathVista reward: thinking format 0/1 + accuracy 0/1 (answer_format and non_repeat stay 0).

The prediction is the last ``\\boxed{…}`` (inside the ``<answer>`` text when there is one), else the
``<answer>`` text; with neither there is nothing to grade and accuracy is 0. Free-form answers are
compared with math-verify, ``verify(parse(gold), parse(pred))`` (gold first, as its API requires);
multiple choice by letter or option text, as the authors' evaluation maps a letter to its option.

Safety: the prediction is parsed with math-verify's LaTeX extractor only (a grammar parser, no
``eval``); its Python-expression extractor, which goes through sympy's ``parse_expr``, is used for
the trusted gold only. Time is bounded three ways: a short length cap, a pre-filter for the
expressions that make sympy compute astronomically large integers (power towers, huge exponents
and factorials), and math-verify's own timeout. That timeout uses ``signal.alarm`` and so works
only on the main thread; elsewhere it is disabled and the first two bounds carry the guarantee.
The pre-filter applies on every thread so a reward never depends on where it was computed.
"""
from __future__ import annotations

import functools
import math
import re
import threading
from typing import Any, Sequence

from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from visurf_megatron.rewards.parsing import MAX_RESPONSE_CHARS, extract_answer, thinking_format_ok
from visurf_megatron.rewards.types import RewardBreakdown

MAX_PRED_CHARS = 256  # MathVista answers are numbers, short phrases or a letter
MAX_BOXED_SCAN_CHARS = 4096
MAX_BRACKET_DEPTH = 8
DEFAULT_TIMEOUT_S = 2.0

_BOXED = "\\boxed{"
_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0),)
_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")
_UPPER_LETTER_RE = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Z])\)?(?:[.:)]|\s|$)", re.IGNORECASE)
_LONE_LETTER_RE = re.compile(r"^\(?([A-Za-z])\)?\.?$")
_FACTORIAL_BOMB_RE = re.compile(r"(?:\d{4}|[)}])\s*!")
_BIG_DIGITS_RE = re.compile(r"\d{4}")
_EXPONENT_TOKEN_RE = re.compile(r"\\?\w*")  # a bare exponent: one command or word, possibly empty


def extract_boxed(text: str, *, max_chars: int = MAX_BOXED_SCAN_CHARS) -> str | None:
    """Content of the last ``\\boxed{…}`` with balanced braces, or None (unbalanced or too long)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    body_start = start + len(_BOXED)
    depth = 1
    for index in range(body_start, min(len(text), body_start + max_chars)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[body_start:index]
    return None


def extract_prediction(response: str) -> str | None:
    """The graded answer string, or None when the response offers none."""
    answer = extract_answer(response)
    region = answer if answer is not None else response
    boxed = extract_boxed(region)
    if boxed is None and _BOXED in region:
        return None  # a broken \boxed is a failed answer, not an invitation to grade the raw text
    prediction = boxed if boxed is not None else answer
    return None if prediction is None else prediction.strip()


def _unwrap(text: str) -> str:
    text = text.strip().strip("$").strip()
    match = _WRAPPER_RE.match(text)
    return match.group(1).strip() if match else text


def _normalise_option(text: str) -> str:
    return " ".join(_unwrap(text).casefold().split()).rstrip(".").strip()


def choice_letter(text: str) -> str | None:
    """``B``, ``(B)``, ``B.``, ``B) text``, ``Option B`` -> ``B``; a lone lowercase ``b`` too.

    Lowercase letters count only alone, so an answer sentence such as ``a cat`` is not option A.
    """
    text = _unwrap(text)
    match = _LONE_LETTER_RE.match(text)
    if match:
        return match.group(1).upper()
    match = _UPPER_LETTER_RE.match(text)
    if match and match.group(1).isupper():
        return match.group(1)
    return None


def choice_index(text: str, choices: Sequence[Any]) -> int | None:
    """Index of the option ``text`` names, by option text first (so ``A cat`` is not letter A), then letter."""
    normalised = _normalise_option(text)
    for index, option in enumerate(choices):
        if _normalise_option(str(option)) == normalised:
            return index
    letter = choice_letter(text)
    if letter is not None and ord(letter) - ord("A") < len(choices):
        return ord(letter) - ord("A")
    return None


def _matching_close(text: str, open_index: int) -> int:
    pairs = {"{": "}", "(": ")"}
    opener, closer = text[open_index], pairs[text[open_index]]
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == opener:
            depth += 1
        elif text[index] == closer:
            depth -= 1
            if depth == 0:
                return index
    return len(text)


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth -= 1
    return deepest


def too_expensive(expr: str) -> bool:
    """Whether sympy could spend unbounded time on ``expr``: deep nesting, power towers,
    exponents with 4+ digit numbers, factorials of 4+ digit numbers or of groups."""
    if len(expr) > MAX_PRED_CHARS or _bracket_depth(expr) > MAX_BRACKET_DEPTH:
        return True
    if _FACTORIAL_BOMB_RE.search(expr):
        return True
    for caret in (i for i, char in enumerate(expr) if char == "^"):
        j = caret + 1
        while j < len(expr) and expr[j].isspace():
            j += 1
        if j < len(expr) and expr[j] in "{(":
            end = _matching_close(expr, j)
            exponent, after = expr[j + 1 : end], end + 1
        else:
            token = _EXPONENT_TOKEN_RE.match(expr, j).group()
            exponent, after = token, j + len(token)
        rest = expr[after:].lstrip()
        if "^" in exponent or rest.startswith("^") or _BIG_DIGITS_RE.search(exponent):
            return True
    return False


def _timeout_seconds(timeout_s: float) -> int | None:
    # math-verify's timeout is signal.alarm: whole seconds, main thread only (it raises elsewhere).
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(timeout_s))


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, seconds: int | None) -> list[Any]:
    # The gold is trusted data and repeats across a group's rollouts: parse it once.
    return parse(gold, parsing_timeout=seconds)


def verify_equal(gold: str, prediction: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """math-verify equivalence of a free-form prediction and the gold answer, never raising."""
    if not prediction or too_expensive(prediction):
        return False
    seconds = _timeout_seconds(timeout_s)
    try:
        gold_parsed = _parse_gold(gold, seconds)
        pred_parsed = parse(_BOXED + prediction + "}", extraction_config=_PRED_CONFIG, parsing_timeout=seconds)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def is_correct(prediction: str, gold: str, choices: Sequence[Any] | None, *, timeout_s: float) -> bool:
    if choices:
        gold_index = choice_index(gold, choices)
        pred_index = choice_index(prediction, choices)
        if gold_index is not None and pred_index is not None:
            return gold_index == pred_index
        # A value instead of a letter (e.g. "1/2" for option "0.5") still counts when it is equal.
        gold_text = str(choices[gold_index]) if gold_index is not None else gold
        return pred_index is None and verify_equal(gold_text, prediction, timeout_s=timeout_s)
    gold_letter = _LONE_LETTER_RE.match(gold.strip())
    if gold_letter and gold.strip().isupper():
        # A lettered gold without its options can only be compared as a letter.
        return choice_letter(prediction) == gold_letter.group(1)
    return verify_equal(gold, prediction, timeout_s=timeout_s)


def math_reward(
    response: str,
    answer: Any,
    *,
    choices: Sequence[Any] | None = None,
    is_ground_truth: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RewardBreakdown:
    """Thinking format (0/1, 0 for the GT row) + accuracy (0/1)."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"math answer must be a string or number, got {type(answer).__name__}")
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return RewardBreakdown()
    thinking = 0.0 if is_ground_truth or not thinking_format_ok(response) else 1.0
    prediction = extract_prediction(response)
    if prediction is None or len(prediction) > MAX_PRED_CHARS:
        return RewardBreakdown(thinking=thinking)
    correct = is_correct(prediction, str(answer).strip(), choices, timeout_s=timeout_s)
    return RewardBreakdown(thinking=thinking, accuracy=float(correct))
