"""Benchmark metrics. Every accumulator keeps O(1) state, so evaluation streams, and merges (``+``)
so data-parallel ranks can reduce their partial states (``state_dict`` is plain numbers).

Grounding (ReasonSeg / gRefCOCO conventions, as in the authors' evaluation):
  per sample I, U of the predicted mask (SAM2 masks OR-ed) against the GT mask;
  gIoU  = mean over samples of I/U, where a no-target sample (empty GT) scores 1 if nothing is
          predicted and 0 otherwise;
  cIoU  = sum I / sum U (a no-target sample adds its false-positive area to U);
  N-Acc = no-target samples with an empty prediction / no-target samples;
  T-Acc = target samples with a non-empty prediction / target samples (GRES);
  bbox accuracy: a sample is correct when ANY predicted box has IoU > 0.5 with the GT box (the
          authors' loop; ``bbox_mode="union"`` instead compares the union box of all predictions).
          A multi-object GT is compared as its union box. A no-target sample is correct iff no box is
          predicted.
Boxes are inclusive-pixel: area = (x2 - x1 + 1) * (y2 - y1 + 1), as in the rewards. (The authors'
evaluation scripts use exclusive areas; on boxes of realistic size the two differ by far less than
the 0.5 threshold's sensitivity, but the rewards and metrics here agree with each other.)

A metric over an empty set (N-Acc without no-target samples...) is ``nan``, never a fake 0 or 1.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Masks and boxes


def mask_iou_stats(pred_mask, gt_mask) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of the same shape."""
    p = np.asarray(pred_mask).astype(bool)
    g = np.asarray(gt_mask).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: pred {p.shape} vs gt {g.shape}")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def box_area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0] + 1) * max(0.0, b[3] - b[1] + 1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive-pixel boxes [x1, y1, x2, y2]."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0.0, iw) * max(0.0, ih)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def union_box(boxes: Sequence[Sequence[float]]) -> list[float] | None:
    if not boxes:
        return None
    arr = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return [float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max())]


def bbox_hit(pred_boxes: Sequence[Sequence[float]], gt_boxes, *, mode: str = "any",
             threshold: float = 0.5) -> bool:
    """One sample's bbox accuracy (see module doc). ``gt_boxes``: a box, a list of boxes, or
    None/[] for a no-target sample."""
    if gt_boxes is not None and len(gt_boxes) and not isinstance(gt_boxes[0], (list, tuple, np.ndarray)):
        gt_boxes = [gt_boxes]
    pred = [list(b) for b in pred_boxes]
    if not gt_boxes:
        return not pred
    gt = union_box(gt_boxes)
    if not pred:
        return False
    if mode == "any":
        return any(box_iou(b, gt) > threshold for b in pred)
    if mode == "union":
        return bool(box_iou(union_box(pred), gt) > threshold)
    raise ValueError(f"bbox mode must be 'any' or 'union', got {mode!r}")


def point_in_box(point: Sequence[float], box: Sequence[float]) -> bool:
    x, y = point[0], point[1]
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def gui_hit(gt_box: Sequence[float], pred_points: Sequence[Sequence[float]] = (),
            pred_boxes: Sequence[Sequence[float]] = ()) -> bool:
    """GUI accuracy for one sample: any predicted point inside the GT box; a predicted object
    without a point counts with its box centre."""
    pts = [list(p) for p in pred_points]
    if not pts:
        pts = [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in pred_boxes]
    return any(point_in_box(p, gt_box) for p in pts)


# ----------------------------------------------------------------------------------------------
# Grounding accumulator


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@dataclass
class GroundingMetrics:
    n: int = 0
    sum_iou: float = 0.0
    sum_inter: int = 0
    sum_union: int = 0
    n_no_target: int = 0
    n_no_target_correct: int = 0
    n_target: int = 0
    n_target_predicted: int = 0
    n_bbox: int = 0
    n_bbox_correct: int = 0
    bbox_mode: str = "any"

    def update(self, pred_mask, gt_mask, *, pred_boxes: Sequence[Sequence[float]] | None = None,
               gt_boxes=None, pred_empty: bool | None = None, no_target: bool | None = None) -> float:
        """Add one sample; returns its IoU (as counted in gIoU).

        ``pred_empty`` defaults to "no predicted boxes" when ``pred_boxes`` is given (the answer
        was ``[]``), else to "the predicted mask is empty". ``no_target`` defaults to "the GT mask
        is empty". Pass ``gt_boxes`` (a box or a list, [] for no target) with ``pred_boxes`` to
        count bbox accuracy.
        """
        inter, union = mask_iou_stats(pred_mask, gt_mask)
        if no_target is None:
            no_target = not np.asarray(gt_mask).any()
        if pred_empty is None:
            pred_empty = (len(pred_boxes) == 0) if pred_boxes is not None else not np.asarray(pred_mask).any()
        iou = self.add_stats(inter, union, no_target=no_target, pred_empty=pred_empty)
        if pred_boxes is not None and (gt_boxes is not None or no_target):
            self.n_bbox += 1
            self.n_bbox_correct += int(bbox_hit(pred_boxes, gt_boxes if not no_target else [],
                                                mode=self.bbox_mode))
        return iou

    def add_stats(self, inter: int, union: int, *, no_target: bool, pred_empty: bool) -> float:
        """Add one sample from precomputed pixel counts (e.g. reduced on another rank)."""
        if no_target:
            iou = 1.0 if pred_empty else 0.0
            self.n_no_target += 1
            self.n_no_target_correct += int(pred_empty)
        else:
            iou = inter / union if union else 0.0
            self.n_target += 1
            self.n_target_predicted += int(not pred_empty)
        self.n += 1
        self.sum_iou += iou
        self.sum_inter += int(inter)
        self.sum_union += int(union)
        return iou

    def compute(self) -> dict[str, float]:
        return {
            "giou": _ratio(self.sum_iou, self.n),
            "ciou": _ratio(self.sum_inter, self.sum_union),
            "n_acc": _ratio(self.n_no_target_correct, self.n_no_target),
            "t_acc": _ratio(self.n_target_predicted, self.n_target),
            "bbox_acc": _ratio(self.n_bbox_correct, self.n_bbox),
            "count": float(self.n),
        }

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __add__(self, other: "GroundingMetrics") -> "GroundingMetrics":
        if self.bbox_mode != other.bbox_mode:
            raise ValueError("cannot merge metrics with different bbox modes")
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name)
                  for f in fields(self) if f.name != "bbox_mode"}
        return GroundingMetrics(**merged, bbox_mode=self.bbox_mode)


@dataclass(frozen=True)
class MaskStats:
    """One sample for the functional forms below."""
    inter: int
    union: int
    no_target: bool
    pred_empty: bool

    @classmethod
    def from_masks(cls, pred_mask, gt_mask) -> "MaskStats":
        i, u = mask_iou_stats(pred_mask, gt_mask)
        return cls(i, u, not np.asarray(gt_mask).any(), not np.asarray(pred_mask).any())


def _acc(stats: Iterable[MaskStats]) -> GroundingMetrics:
    m = GroundingMetrics()
    for st in stats:
        m.add_stats(st.inter, st.union, no_target=st.no_target, pred_empty=st.pred_empty)
    return m


def giou(samples: Iterable[MaskStats]) -> float:
    return _acc(samples).compute()["giou"]


def ciou(samples: Iterable[MaskStats]) -> float:
    return _acc(samples).compute()["ciou"]


def n_acc(samples: Iterable[MaskStats]) -> float:
    return _acc(samples).compute()["n_acc"]


def t_acc(samples: Iterable[MaskStats]) -> float:
    return _acc(samples).compute()["t_acc"]


def bbox_accuracy(pred_boxes_per_sample: Sequence[Sequence[Sequence[float]]],
                  gt_boxes_per_sample: Sequence, *, mode: str = "any") -> float:
    if len(pred_boxes_per_sample) != len(gt_boxes_per_sample):
        raise ValueError("bbox_accuracy: prediction and GT counts differ")
    hits = [bbox_hit(p, g, mode=mode) for p, g in zip(pred_boxes_per_sample, gt_boxes_per_sample)]
    return _ratio(sum(hits), len(hits))


def gui_accuracy(gt_boxes: Sequence[Sequence[float]], pred_points: Sequence[Sequence[Sequence[float]]]) -> float:
    if len(gt_boxes) != len(pred_points):
        raise ValueError("gui_accuracy: prediction and GT counts differ")
    return _ratio(sum(gui_hit(b, p) for b, p in zip(gt_boxes, pred_points)), len(gt_boxes))


# ----------------------------------------------------------------------------------------------
# Scalar accumulator for per-sample scores (GUI hits, math correctness, ANLS, relaxed accuracy)


@dataclass
class MeanMetric:
    total: float = 0.0
    count: int = 0

    def update(self, value: float) -> float:
        self.total += float(value)
        self.count += 1
        return float(value)

    def compute(self) -> float:
        return _ratio(self.total, self.count)

    def __add__(self, other: "MeanMetric") -> "MeanMetric":
        return MeanMetric(self.total + other.total, self.count + other.count)


# ----------------------------------------------------------------------------------------------
# Anomaly


def anomaly_score_from_mask(pred_mask) -> float:
    """The authors' continuous anomaly score: predicted mask area / image area."""
    m = np.asarray(pred_mask).astype(bool)
    return float(m.sum()) / m.size if m.size else 0.0


def anomaly_roc_auc(labels: Sequence[int], scores: Sequence[float], *, binarize: bool = False) -> float:
    """Image-level ROC-AUC on a continuous score (e.g. ``anomaly_score_from_mask``).

    ``binarize=True`` reproduces the authors' script, which thresholds the score at > 0 first
    (their AUC is then balanced accuracy, not a ranking metric). ``nan`` with one class only.
    Computed as the Mann-Whitney U of the positives over the negatives, U / (n_pos n_neg): the
    probability that a random anomaly outranks a random normal image, ties counting one half.
    (scikit-learn gives the same number but its import alone costs ~2 s in every process that
    imports transformers, which loads it when present.)
    """
    from scipy.stats import mannwhitneyu

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError("anomaly_roc_auc: labels and scores differ in length")
    if binarize:
        s = (s > 0).astype(float)
    if len(np.unique(y)) < 2:
        return float("nan")
    pos, neg = s[y == 1], s[y != 1]
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------------------------
# Math (MathVista): math-verify, multiple choice by letter or text


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def _answer_text(pred: str) -> str:
    m = re.search(r"<answer>(.*?)</answer>", pred, re.DOTALL)
    return m.group(1) if m else pred


def _norm_choice(s: str) -> str:
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return " ".join(s.strip().strip("$().").lower().split())


def math_correct(gold, pred: str, *, choices: Sequence[str] | None = None) -> bool:
    """Is the prediction (a full response or a bare answer) right? Multiple choice compares the
    letter or the option text; everything else uses math-verify ``verify(parse(gold), parse(pred))``."""
    from math_verify import parse, verify

    gold = str(gold).strip()
    text = _answer_text(pred)
    boxed = extract_boxed(text)
    if choices:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(choices)]
        norm_choices = [_norm_choice(c) for c in choices]

        def to_letter(s: str) -> str | None:
            n = _norm_choice(s)
            if len(n) == 1 and n.upper() in letters:
                return n.upper()
            return letters[norm_choices.index(n)] if n in norm_choices else None

        gold_letter = to_letter(gold)
        cand = boxed if boxed is not None else text
        if gold_letter is not None and to_letter(cand) is not None:
            return to_letter(cand) == gold_letter
    gold_parsed = parse(gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$")
    if not gold_parsed:
        gold_parsed = parse(f"\\boxed{{{gold}}}")
    pred_src = f"\\boxed{{{boxed}}}" if boxed is not None else text
    try:
        return bool(verify(gold_parsed, parse(pred_src)))
    except Exception:  # math-verify can raise on exotic LaTeX; an unverifiable answer is wrong
        return False


def math_accuracy(golds: Sequence, preds: Sequence[str],
                  choices: Sequence[Sequence[str] | None] | None = None) -> float:
    if len(golds) != len(preds):
        raise ValueError("math_accuracy: prediction and GT counts differ")
    choices = choices if choices is not None else [None] * len(golds)
    return _ratio(sum(math_correct(g, p, choices=c) for g, p, c in zip(golds, preds, choices)), len(golds))


# ----------------------------------------------------------------------------------------------
# Forgetting benchmarks: ChartQA relaxed accuracy, DocVQA ANLS


def _to_float(text: str) -> float | None:
    t = text.strip().replace(",", "")
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100.0
        return float(t)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA (Methani et al.; pix2struct's implementation): numbers within 5% relative error,
    otherwise case-insensitive exact match. A target of 0 falls back to the string match (relative
    error is undefined there), as in pix2struct."""
    pred_f, target_f = _to_float(str(prediction)), _to_float(str(target))
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return str(prediction).strip().lower() == str(target).strip().lower()


def relaxed_accuracy(targets: Sequence, predictions: Sequence[str], max_relative_change: float = 0.05) -> float:
    """Mean relaxed correctness; a target may be a list of acceptable answers (best one counts)."""
    if len(targets) != len(predictions):
        raise ValueError("relaxed_accuracy: prediction and GT counts differ")
    hits = []
    for t, p in zip(targets, predictions):
        ts = t if isinstance(t, (list, tuple)) else [t]
        hits.append(any(relaxed_correctness(x, p, max_relative_change) for x in ts))
    return _ratio(sum(hits), len(hits))


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(s: str) -> str:
    return " ".join(str(s).strip().lower().split())


def anls_score(answers: Sequence[str] | str, prediction: str, threshold: float = 0.5) -> float:
    """Per-question ANLS (Biten et al. 2019): max over GT answers of 1 - NL, where
    NL = Levenshtein / max(len) on lower-cased, whitespace-collapsed strings, and 0 when NL >= 0.5."""
    if isinstance(answers, str):
        answers = [answers]
    p = _anls_norm(prediction)
    best = 0.0
    for a in answers:
        g = _anls_norm(a)
        longest = max(len(g), len(p))
        nl = levenshtein(g, p) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(answers_per_question: Sequence, predictions: Sequence[str], threshold: float = 0.5) -> float:
    if len(answers_per_question) != len(predictions):
        raise ValueError("anls: prediction and GT counts differ")
    scores = [anls_score(a, p, threshold) for a, p in zip(answers_per_question, predictions)]
    return _ratio(sum(scores), len(scores))


def nanmean_dict(dicts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Average metric dicts key-wise, ignoring NaN (for per-benchmark summaries)."""
    acc: dict[str, list[float]] = {}
    for d in dicts:
        for k, v in d.items():
            if not (isinstance(v, float) and math.isnan(v)):
                acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}
