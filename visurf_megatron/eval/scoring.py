"""One response -> one ``predictions.jsonl`` record, and records -> the benchmark metrics.

A record holds everything the metrics need (pixel counts, flags, correctness), so metrics are
recomputed from ``predictions.jsonl`` alone: after an interruption, or to re-tabulate a run.

Coordinates: the policy answers in the ``image_size`` square it was shown (``data/images.py``);
``predicted_objects`` maps its boxes and points to the original ``width x height`` frame, rounding
half-up as the authors do (``int(v * width / 840 + 0.5)``); they are not clipped (the segmenters
clip). An unparseable answer is an empty prediction (no mask), as in the authors' evaluation; its
``parse_error`` is kept and counted (``parse_fail_rate``), so a model that cannot answer does not
hide behind the N-Acc of no-target samples.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from visurf_megatron.data.images import unscale_objects
from visurf_megatron.rewards.parsing import extract_answer, object_box, object_point, parse_response

from .metrics import (GroundingMetrics, MeanMetric, anls_score, anomaly_roc_auc, anomaly_score_from_mask, bbox_hit,
                      gui_hit, math_correct, mask_iou_stats, relaxed_correctness)

MAX_OBJECTS = 120  # as the rewards: more predicted objects than any benchmark has are not prompted


def predicted_objects(response: str, image_size: int, width: int, height: int):
    """(objects in the original frame, parse error or None, number of objects without a usable
    ``bbox_2d`` or ``point_2d``)."""
    parsed = parse_response(response)
    if parsed.objects is None:
        return [], parsed.error, 0
    objects, invalid = [], 0
    for obj in parsed.objects[:MAX_OBJECTS]:
        box, point = object_box(obj), object_point(obj)
        if box is None and point is None:
            invalid += 1
            continue
        o: dict[str, list[float]] = {}
        if box is not None:
            o["bbox_2d"] = list(box)
        if point is not None:
            o["point_2d"] = list(point)
        objects.append(o)
    invalid += max(0, len(parsed.objects) - MAX_OBJECTS)
    return unscale_objects(objects, image_size / width, image_size / height, to_int=True), None, invalid


def answer_text(response: str) -> str:
    """The short answer of a QA response: the last ``<answer>`` body, else the whole response."""
    a = extract_answer(response)
    return (a if a is not None else response).strip()


def grounding_stats(objects: Sequence[dict], pred_mask: np.ndarray, gt_mask: np.ndarray,
                    gt_boxes: Sequence[Sequence[float]] | None, *, bbox_mode: str = "any") -> dict[str, Any]:
    """Per-sample counts of ``GroundingMetrics`` (same definitions: see ``metrics.py``)."""
    inter, union = mask_iou_stats(pred_mask, gt_mask)
    no_target = not bool(gt_mask.any())
    pred_empty = len(objects) == 0
    pred_boxes = [o["bbox_2d"] for o in objects if o.get("bbox_2d") is not None]
    iou = (1.0 if pred_empty else 0.0) if no_target else (inter / union if union else 0.0)
    return {"inter": inter, "union": union, "iou": iou, "no_target": no_target, "pred_empty": pred_empty,
            "bbox_hit": bool(bbox_hit(pred_boxes, [] if no_target else (gt_boxes or []), mode=bbox_mode)),
            "pred_area": int(pred_mask.sum()), "gt_area": int(gt_mask.sum())}


def score_sample(item, response: str, *, image, image_size: int, segmenter, bbox_mode: str = "any"):
    """(record fields for one sample, visuals for the overlay). ``image`` is the stored image (PIL)."""
    from .datasets import mask_box

    sample, task = item.sample, item.sample.task
    stored = image.size if image is not None else (1, 1)
    rec: dict[str, Any] = {}
    visual: dict[str, Any] = {}
    if task in ("grounding", "anomaly", "gui"):
        width, height = item.frame(stored)
        frame_image = image if image.size == (width, height) else image.resize((width, height))
        objects, error, invalid = predicted_objects(response, image_size, width, height)
        rec.update(objects=objects, parse_error=error, n_invalid_objects=invalid)
        gt_boxes = item.boxes_in_original(stored)
        visual.update(image=frame_image, objects=objects, gt_boxes=gt_boxes or [])
        if task == "gui":
            hit = bool(gui_hit(gt_boxes[0], [o["point_2d"] for o in objects if "point_2d" in o],
                               [o["bbox_2d"] for o in objects if "bbox_2d" in o]))
            rec["stats"] = {"hit": hit, "gt_box": gt_boxes[0]}
            visual["caption"] = "hit" if hit else "miss"
            return rec, visual
        gt_mask = item.gt_mask(stored)
        pred_mask = segmenter.segment(frame_image, objects) if objects else np.zeros((height, width), bool)
        if gt_boxes is None:
            box = mask_box(gt_mask)
            gt_boxes = [] if box is None else [box]
        stats = grounding_stats(objects, pred_mask, gt_mask, gt_boxes, bbox_mode=bbox_mode)
        if task == "anomaly":
            answer = (extract_answer(response) or "").strip().lower()
            yes_no = answer if error is not None and answer in ("yes", "no") else None
            stats["label"] = item.anomaly_label(gt_mask)
            stats["pred_label"] = int(yes_no == "yes") if yes_no is not None else int(bool(objects))
            stats["score"] = (float(stats["pred_label"]) if yes_no is not None
                              else anomaly_score_from_mask(pred_mask))
        rec["stats"] = stats
        visual.update(pred_mask=pred_mask, gt_mask=gt_mask, caption=f"IoU {stats['iou']:.3f}")
        return rec, visual
    answer = answer_text(response)
    gold = sample.solution
    if task == "math":
        ok = bool(math_correct(gold, response, choices=sample.choices))
        rec.update(answer=answer, stats={"correct": ok, "gold": gold})
    elif task == "chartqa":
        golds = sample.meta.get("answers") or [gold]
        ok = any(relaxed_correctness(g, answer) for g in golds)
        rec.update(answer=answer, stats={"correct": bool(ok), "gold": golds})
    elif task == "docvqa":
        rec.update(answer=answer, stats={"anls": anls_score(gold, answer), "gold": gold})
    else:  # pragma: no cover - tasks are validated on load
        raise ValueError(f"unknown task {task!r}")
    visual.update(image=image, caption=f"pred: {answer[:60]} | gold: {str(rec['stats']['gold'])[:40]}")
    return rec, visual


def _clean(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_from_records(records: Sequence[dict], task: str, *, bbox_mode: str = "any") -> dict[str, Any]:
    """Benchmark metrics over ``records`` (taken in their ``index`` order, so the float sums, and
    hence the file, do not depend on the order samples finished in). NaN (an empty set) -> None."""
    records = sorted(records, key=lambda r: r["index"])
    out: dict[str, Any] = {}
    if task in ("grounding", "anomaly"):
        m = GroundingMetrics(bbox_mode=bbox_mode)
        for r in records:
            st = r["stats"]
            m.add_stats(st["inter"], st["union"], no_target=st["no_target"], pred_empty=st["pred_empty"])
            m.n_bbox += 1
            m.n_bbox_correct += int(st["bbox_hit"])
        g = m.compute()
        if task == "grounding":
            out.update(giou=g["giou"], ciou=g["ciou"], n_acc=g["n_acc"], t_acc=g["t_acc"], bbox_acc=g["bbox_acc"])
        else:
            labels = [r["stats"]["label"] for r in records]
            acc = MeanMetric()
            for r in records:
                acc.update(r["stats"]["pred_label"] == r["stats"]["label"])
            out.update(roc_auc=anomaly_roc_auc(labels, [r["stats"]["score"] for r in records]) if records
                       else float("nan"), acc=acc.compute(), giou=g["giou"], ciou=g["ciou"])
    elif task == "gui":
        out["accuracy"] = _mean(r["stats"]["hit"] for r in records)
    elif task in ("math", "chartqa"):
        out["accuracy" if task == "math" else "relaxed_acc"] = _mean(r["stats"]["correct"] for r in records)
    elif task == "docvqa":
        out["anls"] = _mean(r["stats"]["anls"] for r in records)
    else:
        raise ValueError(f"unknown task {task!r}")
    if task in ("grounding", "anomaly", "gui"):
        out["parse_fail_rate"] = _mean(r.get("parse_error") is not None for r in records)
    out["truncated_rate"] = _mean(r.get("finish_reason") == "length" for r in records)
    out["count"] = len(records)
    return {k: _clean(float(v)) if k != "count" else v for k, v in out.items()}


def _mean(values) -> float:
    m = MeanMetric()
    for v in values:
        m.update(float(v))
    return m.compute()


HEADLINE = {
    "grounding": ("giou", "ciou", "n_acc", "t_acc", "bbox_acc"),
    "anomaly": ("roc_auc", "acc", "giou", "ciou"),
    "gui": ("accuracy",),
    "math": ("accuracy",),
    "chartqa": ("relaxed_acc",),
    "docvqa": ("anls",),
}
