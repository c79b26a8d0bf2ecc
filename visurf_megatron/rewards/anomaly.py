"""Anomaly reward for both kinds of anomaly labels the data layer produces (``data/samples.py``).

* A ``"yes"``/``"no"`` label: thinking format 0/1 + agreement 0/1 (answer_format and non_repeat
  stay 0). The prediction is the first word of the ``<answer>`` text, case-insensitive, punctuation
  ignored (``Yes.``, ``YES, a scratch``). Because the anomaly prompt asks for boxes, an answer that
  is an object list also reads as a verdict: non-empty means yes, ``[]`` means no.
* Object boxes (``[]`` for a normal image): the anomaly is grounded like any object, so the full
  VisionReasoner grounding reward applies (max 7).

Without answer tags there is no prediction.
"""
from __future__ import annotations

import re
from typing import Any

from visurf_megatron.rewards.grounding import thinking_reward, vision_reasoner_reward
from visurf_megatron.rewards.parsing import parse_response
from visurf_megatron.rewards.types import RewardBreakdown

_FIRST_WORD_RE = re.compile(r"\w+")
_LABELS = ("yes", "no")


def first_word(text: str) -> str | None:
    # Only the head is needed; slicing keeps the scan bounded on a huge answer.
    match = _FIRST_WORD_RE.search(text[:256])
    return match.group().casefold() if match else None


def yes_no_label(answer: Any) -> str | None:
    """``yes``/``no`` for a label answer, None for anything else (e.g. an object list)."""
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    if isinstance(answer, str) and answer.strip().casefold() in _LABELS:
        return answer.strip().casefold()
    return None


def anomaly_reward(response: str, answer: Any, *, is_ground_truth: bool = False) -> RewardBreakdown:
    label = yes_no_label(answer)
    if label is None:
        if isinstance(answer, str) and not answer.lstrip().startswith("["):
            raise ValueError(f"anomaly answer must be 'yes', 'no' or a list of objects, got {answer!r}")
        return vision_reasoner_reward(response, answer, is_ground_truth=is_ground_truth)
    parsed = parse_response(response)
    if parsed.objects is not None:
        predicted = "yes" if parsed.objects else "no"
    else:
        predicted = first_word(parsed.answer) if parsed.answer is not None else None
    return RewardBreakdown(
        thinking=thinking_reward(parsed, is_ground_truth=is_ground_truth),
        accuracy=float(predicted == label),
    )
