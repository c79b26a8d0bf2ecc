"""PNG overlays of single evaluation samples: the image in the original frame with the GT mask
(green tint) and boxes (green), the predicted mask (red tint), boxes (red) and points (red dots),
and a caption (query, per-sample score). Text-only tasks get the image (if any) and the caption."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

GT_COLOR = (40, 200, 60)
PRED_COLOR = (230, 40, 40)
MIN_SIDE = 320  # tiny images are scaled up (nearest) so that boxes and text stay readable
MAX_SIDE = 1024


def _tint(rgb: np.ndarray, mask: np.ndarray | None, color, alpha: float) -> np.ndarray:
    if mask is None or not mask.any():
        return rgb
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    return out.astype(np.uint8)


def render_overlay(image, *, objects: Sequence[dict] = (), gt_boxes: Sequence[Sequence[float]] = (),
                   pred_mask: np.ndarray | None = None, gt_mask: np.ndarray | None = None, caption: str = ""):
    """A PIL image (RGB) of one sample; coordinates are in ``image``'s pixel frame."""
    from PIL import Image, ImageDraw

    if image is None:
        image = Image.new("RGB", (MIN_SIDE, 8), (255, 255, 255))
    rgb = np.asarray(image.convert("RGB"))
    rgb = _tint(_tint(rgb, gt_mask, GT_COLOR, 0.45), pred_mask, PRED_COLOR, 0.45)
    w, h = image.size
    side = max(w, h)
    scale = MIN_SIDE / side if side < MIN_SIDE else (MAX_SIDE / side if side > MAX_SIDE else 1.0)
    canvas = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                         Image.NEAREST if scale >= 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    lw = max(1, round(scale))

    def box(b, color):
        draw.rectangle([b[0] * scale, b[1] * scale, (b[2] + 1) * scale - 1, (b[3] + 1) * scale - 1],
                       outline=color, width=lw)

    for b in gt_boxes:
        box(b, GT_COLOR)
    for o in objects:
        if o.get("bbox_2d") is not None:
            box(o["bbox_2d"], PRED_COLOR)
        if o.get("point_2d") is not None:
            x, y = ((v + 0.5) * scale for v in o["point_2d"])
            r = 2 + lw
            draw.ellipse([x - r, y - r, x + r, y + r], fill=PRED_COLOR, outline=(255, 255, 255))
    lines = []
    for para in caption.splitlines() or [""]:
        lines += textwrap.wrap(para, width=max(20, canvas.width // 7)) or [""]
    band = 14 * len(lines) + 8
    out = Image.new("RGB", (canvas.width, canvas.height + band), (255, 255, 255))
    out.paste(canvas, (0, 0))
    text = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        text.text((4, canvas.height + 4 + 14 * i), line, fill=(0, 0, 0))
    return out


def save_overlay(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(**kwargs).save(path, format="PNG")
    return path
