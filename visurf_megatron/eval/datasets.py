"""Evaluation sets: ``data.samples`` rows plus the ground truth the metrics need.

Accepted layouts (JSONL, Parquet or a ``datasets.save_to_disk`` directory; read by the same readers
and validated by the same ``row_to_sample`` as training data):

* **our schema** (``data/samples.py``): ``problem``, ``solution`` (objects / GUI box in the stored
  image's pixel frame), ``image``, ``img_width``/``img_height``, ``mask`` (a path);
* **the authors' benchmark layout** (VisionReasoner / Seg-Zero evaluation sets): ``image``, ``text``,
  ``mask``, ``bbox``, ``img_height``, ``img_width``, where
  ``mask`` is a path, a 2-D 0/1 array (nested lists), COCO RLE (``{"size": [h, w], "counts": str or
  list}``) or polygons (``[[x1, y1, x2, y2, ...], ...]``) in the original frame, and ``bbox`` one
  ``[x1, y1, x2, y2]`` box or a list of them in the original frame (``[]``/``None``: no target);
* **math**: ``text``, ``answer``, ``choices``; **chartqa / docvqa**: ``question``/``text`` and
  ``answer`` or ``answers`` (a list: every acceptable answer). **anomaly** may add ``label``
  (yes/no, bool or 0/1); else a non-empty GT mask / box list means "anomalous".

The evaluation frame is the original image (``img_width`` x ``img_height``): predictions are mapped
there, GT masks are compared there (a mask of another size is resized nearest-neighbour). Without a
mask the GT mask is the union of the filled GT boxes (all zeros for no target).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visurf_megatron.data.samples import (
    TASKS, DataValidationError, Sample, iter_dataset_rows, row_to_sample,
)


# ----------------------------------------------------------------------------------------------
# Mask encodings


def rle_counts_from_string(s: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' ``rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (``counts`` compressed string or list; column-major runs starting with 0s) -> bool [h, w]."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    if sum(counts) != h * w:
        raise ValueError(f"mask: RLE runs sum to {sum(counts)}, expected {h}*{w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((w, h)).T.copy()


def polygons_to_mask(polygons, width: int, height: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        pts = [float(v) for v in poly]
        if len(pts) >= 6:
            draw.polygon(list(zip(pts[0::2], pts[1::2])), fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def boxes_to_mask(boxes, width: int, height: int) -> np.ndarray:
    """Union of inclusive-pixel boxes, clipped to the image."""
    m = np.zeros((height, width), bool)
    for b in boxes or []:
        x1, y1 = max(int(np.floor(b[0])), 0), max(int(np.floor(b[1])), 0)
        x2, y2 = min(int(np.ceil(b[2])), width - 1), min(int(np.ceil(b[3])), height - 1)
        if x2 >= x1 and y2 >= y1:
            m[y1:y2 + 1, x1:x2 + 1] = True
    return m


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0


def mask_box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    return None if not len(xs) else [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


# ----------------------------------------------------------------------------------------------
# One evaluation item


@dataclass
class EvalItem:
    """A validated ``Sample`` and its ground truth. ``gt_boxes`` are in ``boxes_frame``: "original"
    (benchmark ``bbox``) or "stored" (our ``solution``, the stored image's frame); None: unknown
    (taken from the GT mask)."""

    sample: Sample
    index: int
    gt_boxes: list[list[float]] | None = None
    boxes_frame: str = "original"
    mask_value: Any = None  # None | ("packed", shape, bits) | RLE dict | polygons (paths live in sample.mask)
    label: int | None = None  # anomaly: 1 anomalous, 0 normal, None: from the GT

    @property
    def id(self) -> str:
        return self.sample.id

    def frame(self, stored_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the evaluation (original) frame."""
        return (self.sample.img_width or stored_size[0], self.sample.img_height or stored_size[1])

    def boxes_in_original(self, stored_size: tuple[int, int]) -> list[list[float]] | None:
        if self.gt_boxes is None or self.boxes_frame == "original":
            return self.gt_boxes
        w, h = self.frame(stored_size)
        fx, fy = w / stored_size[0], h / stored_size[1]
        return [[b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy] for b in self.gt_boxes]

    def gt_mask(self, stored_size: tuple[int, int]) -> np.ndarray:
        """Boolean GT mask [height, width] in the original frame."""
        w, h = self.frame(stored_size)
        mv = self.mask_value
        if self.sample.mask is not None:
            mask = self.sample.load_mask()
        elif isinstance(mv, tuple) and mv[0] == "packed":
            shape = mv[1]
            mask = np.unpackbits(mv[2], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        elif isinstance(mv, dict):
            mask = decode_rle(mv)
        elif mv is not None:
            mask = polygons_to_mask(mv, w, h)
        else:
            return boxes_to_mask(self.boxes_in_original(stored_size), w, h)
        return resize_mask(mask, w, h)

    def anomaly_label(self, gt_mask: np.ndarray | None) -> int:
        if self.label is not None:
            return self.label
        if isinstance(self.sample.solution, str):
            return int(self.sample.solution == "yes")
        if gt_mask is not None:
            return int(bool(gt_mask.any()))
        return int(bool(self.gt_boxes))


# ----------------------------------------------------------------------------------------------
# Rows


def _boxes(value: Any) -> list[list[float]] | None:
    """``bbox`` column -> list of boxes (None when absent)."""
    if value is None:
        return None
    if isinstance(value, str):
        import json

        value = json.loads(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"bbox: must be a box or a list of boxes, got {type(value).__name__}")
    if len(value) == 0:
        return []
    if not isinstance(value[0], (list, tuple)):
        value = [value]
    out = []
    for b in value:
        if len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
            raise ValueError(f"bbox: each box must be 4 numbers, got {b!r}")
        if b[0] > b[2] or b[1] > b[3]:
            raise ValueError(f"bbox: need x1<=x2 and y1<=y2, got {b!r}")
        out.append([float(v) for v in b])
    return out


def _label(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("yes", "no", "1", "0", "true", "false", "anomaly", "normal"):
            return int(v in ("yes", "1", "true", "anomaly"))
        raise ValueError(f"label: expected yes/no, got {value!r}")
    return int(bool(value))


def _mask_value(value: Any):
    """(path or None, in-memory mask value or None)."""
    if value is None or isinstance(value, str):
        return value or None, None
    if isinstance(value, dict):
        if "size" not in value or "counts" not in value:
            raise ValueError("mask: a dict must be COCO RLE with 'size' and 'counts'")
        return None, value
    arr = value if isinstance(value, np.ndarray) else None
    if arr is None and isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray)):
        lens = {len(r) for r in value}
        if len(lens) == 1 and len(value) > 1 and lens.pop() > 2 and all(
                isinstance(v, (int, float, bool, np.integer)) and v in (0, 1) for v in value[0][:64]):
            arr = np.asarray(value)
        else:
            return None, [list(p) for p in value]  # polygons
    if arr is None or arr.ndim != 2:
        raise ValueError("mask: expected a path, a 2-D array, COCO RLE or polygons")
    arr = arr.astype(bool)
    return None, ("packed", arr.shape, np.packbits(arr.ravel()))


def row_to_item(row: dict, *, task: str, root: Path, index: int, check_images: bool = True,
                image_cache_dir: Path | None = None, fallback_id: str = "") -> EvalItem:
    row = dict(row)
    row_task = row.get("task") or task
    # Column aliases of public releases (MathVista: pid / decoded_image; ChartQA: query / label).
    if row.get("id") is None and row.get("pid") is not None:
        row["id"] = row.pop("pid")
    if row.get("decoded_image") is not None:
        row["image"] = row.pop("decoded_image")
    if all(row.get(k) is None for k in ("problem", "text", "question")) and row.get("query") is not None:
        row["question"] = row.pop("query")
    mask_path, mask_value = _mask_value(row.pop("mask", None))
    if mask_path is not None:
        row["mask"] = mask_path
    bbox = _boxes(row.pop("bbox", None))
    label = _label(row.pop("label", None)) if row_task == "anomaly" else None
    if row.get("solution") is None and row.get("answer") is None:
        for key in ("answers", "label"):
            if row.get(key) is not None:
                row["solution"] = row.pop(key)
                break
    if row_task == "chartqa" and isinstance(row.get("solution", row.get("answer")), (list, tuple)):
        answers = [str(a) for a in row.pop("solution", None) or row.pop("answer")]
        row["solution"], row["answers"] = answers[0], answers  # every acceptable answer is scored
    has_solution = row.get("solution") is not None or row.get("answer") is not None
    gt_boxes, frame = bbox, "original"
    if row_task in ("grounding", "anomaly") and not has_solution:
        # The benchmark row has no answer in our schema: a placeholder passes validation, the metrics
        # use the mask / bbox columns (and points are never scored).
        placeholder = [{"bbox_2d": b, "point_2d": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]} for b in (bbox or [])]
        row["solution"] = placeholder
        row["solution_placeholder"] = True
    elif row_task == "gui" and not has_solution:
        if not bbox or len(bbox) != 1:
            raise ValueError("bbox: a GUI sample needs exactly one target box")
        row["solution"] = bbox[0]
    sample = row_to_sample(row, default_task=task, root=root, check_images=check_images,
                           image_cache_dir=image_cache_dir, fallback_id=fallback_id)
    if sample.task != task:
        raise ValueError(f"task: row is {sample.task!r}, evaluating {task!r}")
    if gt_boxes is None and has_solution:
        sol = sample.solution
        if sample.task == "gui":
            gt_boxes = [list(sol)]
        elif sample.task in ("grounding", "anomaly") and isinstance(sol, list):
            gt_boxes = [list(o["bbox_2d"]) for o in sol]
        frame = "stored"
    return EvalItem(sample=sample, index=index, gt_boxes=gt_boxes, boxes_frame=frame,
                    mask_value=mask_value, label=label)


def load_eval_items(path, *, task: str, split: str | None = None, image_root=None, check_images: bool = True,
                    image_cache_dir=None) -> list[EvalItem]:
    """Every row of an evaluation set as an ``EvalItem`` (a bad row raises ``DataValidationError``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    rows, root = iter_dataset_rows(path, split=split, image_root=image_root)
    cache = Path(image_cache_dir) if image_cache_dir is not None else None
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for rowno, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"row must be an object, got {type(row).__name__}")
            item = row_to_item(row, task=task, root=root, index=len(items), check_images=check_images,
                               image_cache_dir=cache, fallback_id=str(rowno))
            if item.id in seen:
                raise ValueError(f"id: {item.id!r} duplicates row {seen[item.id]}")
            seen[item.id] = rowno
        except ValueError as e:
            raise DataValidationError(rowno, str(e)) from None
        items.append(item)
    if not items:
        raise ValueError(f"{p}: no samples")
    return items


