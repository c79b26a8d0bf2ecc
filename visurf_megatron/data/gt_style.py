"""Render the ground truth y* as a response in the policy's own style (ViSurf reward control 1).

A style fixes: a thinking block or not (the GT has no reasoning, so the block is empty: reward
control 2 zeroes its thinking term anyway), JSON separators, key order (bbox_2d then point_2d) and
integer coordinates. Rounding is half-up (``floor(x + 0.5)``), the authors' ``int(x + 0.5)`` for
non-negative coordinates; Python's ``round`` would send 2.5 to 2.

``choose_gt_style`` picks the style the current policy finds most likely; the caller supplies the
scorer (teacher-forced log-prob of the rendered text under the policy).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .samples import Sample

THINK_COMPACT = "think_compact"
THINK_SPACED = "think_spaced"
NOTHINK_COMPACT = "nothink_compact"
NOTHINK_SPACED = "nothink_spaced"


@dataclass(frozen=True)
class GTStyle:
    name: str
    think: bool
    compact: bool
    # Text between <think> and </think>; empty by default (the GT carries no reasoning).
    think_text: str = ""

    @property
    def separators(self) -> tuple[str, str]:
        return (",", ":") if self.compact else (", ", ": ")


GT_STYLES: dict[str, GTStyle] = {
    THINK_COMPACT: GTStyle(THINK_COMPACT, think=True, compact=True),
    THINK_SPACED: GTStyle(THINK_SPACED, think=True, compact=False),
    NOTHINK_COMPACT: GTStyle(NOTHINK_COMPACT, think=False, compact=True),
    NOTHINK_SPACED: GTStyle(NOTHINK_SPACED, think=False, compact=False),
}


def register_gt_style(style: GTStyle, *, overwrite: bool = False) -> None:
    if style.name in GT_STYLES and not overwrite:
        raise KeyError(f"GT style {style.name!r} exists; pass overwrite=True")
    GT_STYLES[style.name] = style


def get_gt_style(style: str | GTStyle) -> GTStyle:
    if isinstance(style, GTStyle):
        return style
    try:
        return GT_STYLES[style]
    except KeyError:
        raise KeyError(f"unknown GT style {style!r} (known: {sorted(GT_STYLES)})") from None


def round_half_up(x: float) -> int:
    return int(math.floor(float(x) + 0.5))


def canonical_objects(objects: Sequence[dict]) -> list[dict[str, list[int]]]:
    """bbox_2d first, point_2d second, integer coordinates; other keys are dropped."""
    out = []
    for obj in objects:
        o: dict[str, list[int]] = {}
        if obj.get("bbox_2d") is not None:
            o["bbox_2d"] = [round_half_up(v) for v in obj["bbox_2d"]]
        if obj.get("point_2d") is not None:
            o["point_2d"] = [round_half_up(v) for v in obj["point_2d"]]
        out.append(o)
    return out


def objects_json(objects: Sequence[dict], compact: bool) -> str:
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(canonical_objects(objects), separators=seps)


def gui_objects(box: Sequence[float]) -> list[dict[str, list[int]]]:
    """A GUI target box as the one-object answer the policy writes: the box and its centre."""
    x1, y1, x2, y2 = box
    return [{"bbox_2d": list(box), "point_2d": [(x1 + x2) / 2, (y1 + y2) / 2]}]


def _format_number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def answer_body(sample: "Sample", style: str | GTStyle) -> str:
    """What goes between <answer> and </answer>."""
    st = get_gt_style(style)
    sol = sample.solution
    if sample.task == "grounding":
        return objects_json(sol, st.compact)
    if sample.task == "gui":
        if isinstance(sol, dict) or (isinstance(sol, list) and sol and isinstance(sol[0], dict)):
            objs = [sol] if isinstance(sol, dict) else sol
        else:
            objs = gui_objects(sol)
        return objects_json(objs, st.compact)
    if sample.task == "anomaly":
        if isinstance(sol, str):
            return sol.strip().lower()
        return objects_json(sol, st.compact)
    if sample.task == "math":
        return "\\boxed{" + _format_number(sol) + "}"
    # ChartQA / DocVQA: the (first acceptable) short answer.
    if isinstance(sol, (list, tuple)):
        sol = sol[0]
    return _format_number(sol)


def render_ground_truth(sample: "Sample", style: str | GTStyle = THINK_COMPACT) -> str:
    st = get_gt_style(style)
    body = f"<answer>{answer_body(sample, st)}</answer>"
    return f"<think>{st.think_text}</think>{body}" if st.think else body


def gt_style_names(styles: Sequence[str | GTStyle] | None = None) -> list[str]:
    """The registered names of ``styles`` (None: every registered style, in registry order); an
    unknown style is a KeyError."""
    return [get_gt_style(s).name for s in (styles if styles is not None else list(GT_STYLES))]


def best_gt_style(scores: Mapping[str, float]) -> str:
    """The highest-scoring style; ties keep the earlier one (the caller's order is its preference)
    and NaN never wins."""
    best, best_score = None, -math.inf
    for name, score in scores.items():
        if not math.isnan(score) and (best is None or score > best_score):
            best, best_score = name, score
    if best is None:
        raise ValueError(f"every GT style scored NaN: {dict(scores)}" if scores else "no GT style to choose from")
    return best


def choose_gt_style(score_fn: Callable[["Sample", str], float], sample: "Sample",
                    styles: Sequence[str | GTStyle] | None = None) -> tuple[str, dict[str, float]]:
    """Render the GT in every style, score each text with ``score_fn(sample, text)`` and return the
    best style name (``best_gt_style``) and all scores."""
    names = gt_style_names(styles)
    if not names:
        raise ValueError("choose_gt_style needs at least one style")
    scores = {name: float(score_fn(sample, render_ground_truth(sample, name))) for name in names}
    return best_gt_style(scores), scores
