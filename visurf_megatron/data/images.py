"""Image sizing: the fixed square frame grounding answers live in, and Qwen2.5-VL's pixel budget.

Coordinate frames. The policy sees every grounding image resized to ``size x size`` (840 in the
paper) and answers in that frame. ``resize_square`` returns ``scale_x = size / width`` and
``scale_y = size / height``: multiply original coordinates by them to enter the square frame
(``scale_objects``), divide to leave it (``unscale_objects``, what evaluation does with predictions;
the authors' ``x_factor = width / 840`` is ``1 / scale_x``).

Rounding. Scaling is exact arithmetic on floats (no rounding unless asked). With ``to_int=True``
coordinates are rounded half-up (``floor(v + 0.5)``, as the authors' ``int(v + 0.5)``) and then
clipped to the target image when ``clip`` is given. An integer coordinate taken through a frame and
back with rounding both ways moves by at most ``0.5 + 0.5 / s`` pixels, where ``s`` is the scale of
the first step: at most 1 px when the first step does not shrink (s >= 1), and exactly 0 px for
square-frame -> larger original -> square-frame (the model's answers survive the trip unchanged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# transformers' Qwen2-VL defaults (Qwen2.5-VL uses the same image processor).
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
QWEN_TEMPORAL_PATCH_SIZE = 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280


def resize_square(image, size: int = 840, resample=None):
    """Resize a PIL image to ``size x size`` (aspect ratio not kept, as the authors do).

    Returns ``(resized, scale_x, scale_y)`` with ``scale_* = size / original``.
    """
    from PIL import Image

    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"image has no pixels: {image.size}")
    resample = Image.BILINEAR if resample is None else resample
    out = image if (w, h) == (size, size) else image.resize((size, size), resample)
    return out, size / w, size / h


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def _transform(objects: Sequence[dict], fx, fy, to_int: bool, clip: tuple[int, int] | None):
    out = []
    for obj in objects:
        o = dict(obj)
        for key, n in (("bbox_2d", 4), ("point_2d", 2)):
            if obj.get(key) is None:
                continue
            vals = [fx(v) if i % 2 == 0 else fy(v) for i, v in enumerate(obj[key])]
            if len(vals) != n:
                raise ValueError(f"{key} must have {n} numbers, got {obj[key]!r}")
            if to_int:
                vals = [_round_half_up(v) for v in vals]
            if clip is not None:
                w, h = clip
                vals = [min(max(v, 0), (w - 1) if i % 2 == 0 else (h - 1)) for i, v in enumerate(vals)]
            o[key] = vals
        out.append(o)
    return out


def scale_objects(objects: Sequence[dict], scale_x: float, scale_y: float, *, to_int: bool = False,
                  clip: tuple[int, int] | None = None) -> list[dict]:
    """Multiply x by ``scale_x`` and y by ``scale_y`` in every ``bbox_2d``/``point_2d``.

    ``clip=(width, height)`` clamps to the inclusive pixel range of the target image.
    """
    return _transform(objects, lambda v: v * scale_x, lambda v: v * scale_y, to_int, clip)


def unscale_objects(objects: Sequence[dict], scale_x: float, scale_y: float, *, to_int: bool = False,
                    clip: tuple[int, int] | None = None) -> list[dict]:
    """Inverse of ``scale_objects`` (divides; no reciprocal is formed, so floats round once)."""
    return _transform(objects, lambda v: v / scale_x, lambda v: v / scale_y, to_int, clip)


@dataclass(frozen=True)
class QwenImageBudget:
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]
    merge_size: int

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens the LLM sees: patches after the 2x2 merger."""
        return self.num_patches // (self.merge_size ** 2)


def _smart_resize():
    # The PIL backend's module imports without torchvision, which CPU environments lack.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # pragma: no cover - older transformers layouts
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def qwen_pixel_budget(height: int, width: int, *, min_pixels: int | None = None,
                      max_pixels: int | None = None, patch_size: int | None = None,
                      merge_size: int | None = None, temporal_patch_size: int | None = None,
                      processor=None) -> QwenImageBudget:
    """Qwen2.5-VL's smart resize for an image of ``height x width``: the resized size (multiples of
    ``patch_size * merge_size``, pixel count within [min_pixels, max_pixels]) and ``grid_thw``.

    Settings come from the arguments, else from ``processor`` (an image processor or a full
    processor with ``.image_processor``), else transformers' defaults. The computation is the
    processor's own ``smart_resize``, so the grid matches what ``processor(images=...)`` returns.
    """
    ip = getattr(processor, "image_processor", processor)
    if ip is not None:
        size = dict(getattr(ip, "size", None) or {})
        min_pixels = min_pixels if min_pixels is not None else size.get(
            "shortest_edge", getattr(ip, "min_pixels", None))
        max_pixels = max_pixels if max_pixels is not None else size.get(
            "longest_edge", getattr(ip, "max_pixels", None))
        patch_size = patch_size or getattr(ip, "patch_size", None)
        merge_size = merge_size or getattr(ip, "merge_size", None)
        temporal_patch_size = temporal_patch_size or getattr(ip, "temporal_patch_size", None)
    min_pixels = QWEN_MIN_PIXELS if min_pixels is None else int(min_pixels)
    max_pixels = QWEN_MAX_PIXELS if max_pixels is None else int(max_pixels)
    patch_size = patch_size or QWEN_PATCH_SIZE
    merge_size = merge_size or QWEN_MERGE_SIZE
    temporal_patch_size = temporal_patch_size or QWEN_TEMPORAL_PATCH_SIZE
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} > max_pixels {max_pixels}")
    rh, rw = _smart_resize()(int(height), int(width), factor=patch_size * merge_size,
                             min_pixels=min_pixels, max_pixels=max_pixels)
    # A still image is one temporal patch: the processor tiles the frame temporal_patch_size times.
    return QwenImageBudget(resized_height=rh, resized_width=rw,
                           grid_thw=(1, rh // patch_size, rw // patch_size), merge_size=merge_size)
