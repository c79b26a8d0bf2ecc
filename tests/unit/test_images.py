"""Square resizing, coordinate scaling both ways, and Qwen2.5-VL's pixel budget."""
import numpy as np
import pytest
from PIL import Image

from visurf_megatron.data.images import (qwen_pixel_budget, resize_square, scale_objects, unscale_objects)


def test_resize_square_scales():
    img = Image.new("RGB", (640, 480), (1, 2, 3))
    out, sx, sy = resize_square(img, 840)
    assert out.size == (840, 840)
    assert (sx, sy) == (1.3125, 1.75)
    same, sx, sy = resize_square(Image.new("RGB", (112, 112)), 112)
    assert same.size == (112, 112) and (sx, sy) == (1.0, 1.0)
    with pytest.raises(ValueError):
        resize_square(img, 0)


def test_scale_objects_hand_computed():
    objs = [{"bbox_2d": [0, 0, 639, 479], "point_2d": [320, 240], "label": "kept"}]
    scaled = scale_objects(objs, 1.3125, 1.75)
    assert scaled == [{"bbox_2d": [0.0, 0.0, 838.6875, 838.25], "point_2d": [420.0, 420.0], "label": "kept"}]
    assert scale_objects(objs, 1.3125, 1.75, to_int=True)[0]["bbox_2d"] == [0, 0, 839, 838]
    # Half-up: 2.5 -> 3 (Python's round would give 2).
    assert scale_objects([{"point_2d": [5, 1]}], 0.5, 2.5, to_int=True) == [{"point_2d": [3, 3]}]
    # Clipping to the inclusive pixel range of the target.
    assert scale_objects([{"bbox_2d": [-3, 2, 900, 5]}], 1, 1, to_int=True, clip=(840, 100)) == [
        {"bbox_2d": [0, 2, 839, 5]}]
    assert objs[0]["bbox_2d"] == [0, 0, 639, 479]  # inputs are not modified


def test_float_roundtrip_is_exact_to_float_precision():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 2000, size=(200, 4))
    objs = [{"bbox_2d": list(map(float, p)), "point_2d": [float(p[0]), float(p[1])]} for p in pts]
    sx, sy = 840 / 1333, 840 / 777
    back = unscale_objects(scale_objects(objs, sx, sy), sx, sy)
    for a, b in zip(objs, back):
        np.testing.assert_allclose(b["bbox_2d"], a["bbox_2d"], rtol=1e-15, atol=1e-12)
        np.testing.assert_allclose(b["point_2d"], a["point_2d"], rtol=1e-15, atol=1e-12)


def test_integer_roundtrip_frame_to_larger_original_is_exact():
    # A model answer in the 840 frame, mapped to a larger original and back, is unchanged.
    sx, sy = 840 / 1280, 840 / 960
    v = list(range(840))
    objs = [{"bbox_2d": [x, y, x, y]} for x, y in zip(v, v[::-1])]
    orig = unscale_objects(objs, sx, sy, to_int=True)
    assert scale_objects(orig, sx, sy, to_int=True) == objs


def test_integer_roundtrip_original_to_frame_within_one_pixel_when_enlarging():
    sx, sy = 840 / 640, 840 / 480
    xs, ys = np.arange(640), np.arange(480)
    objs = [{"point_2d": [int(x), int(ys[i % 480])]} for i, x in enumerate(xs)]
    back = unscale_objects(scale_objects(objs, sx, sy, to_int=True), sx, sy, to_int=True)
    err = np.abs(np.array([o["point_2d"] for o in back]) - np.array([o["point_2d"] for o in objs]))
    assert err.max() <= 1
    # When the first step shrinks, precision lost in the coarse frame cannot come back: the
    # documented bound is 0.5 + 0.5/s. At s = 1/5 the frame holds every 5th pixel: off by 2.
    s = 840 / 4200
    objs = [{"point_2d": [x, x]} for x in range(4200)]
    back = unscale_objects(scale_objects(objs, s, s, to_int=True), s, s, to_int=True)
    err = max(abs(b["point_2d"][0] - a["point_2d"][0]) for a, b in zip(objs, back))
    assert err == 2 <= 0.5 + 0.5 / s


CASES = [
    # (height, width, min_pixels, max_pixels)
    (840, 840, None, None),
    (112, 112, None, None),
    (480, 640, None, None),
    (30, 50, 56 * 56, 28 * 28 * 1280),          # upscaled to reach min_pixels
    (2000, 3000, 3136, 200_704),                 # downscaled under a small max_pixels
    (333, 777, 3136, 12_845_056),                # the released Qwen2.5-VL budget
    (1000, 60, 100 * 28 * 28, 1_003_520),
]


@pytest.mark.parametrize("h,w,min_px,max_px", CASES)
def test_qwen_budget_matches_transformers_processor(h, w, min_px, max_px):
    from transformers import Qwen2VLImageProcessorPil

    kw = {} if min_px is None else {"min_pixels": min_px, "max_pixels": max_px}
    proc = Qwen2VLImageProcessorPil(**kw)
    out = proc(images=[Image.new("RGB", (w, h), (10, 200, 30))], return_tensors="np")
    grid = tuple(int(v) for v in out["image_grid_thw"][0])
    # From explicit settings and from the processor itself.
    for budget in (qwen_pixel_budget(h, w, **kw), qwen_pixel_budget(h, w, processor=proc)):
        assert budget.grid_thw == grid
        assert (budget.resized_height, budget.resized_width) == (grid[1] * 14, grid[2] * 14)
        assert budget.num_patches == out["pixel_values"].shape[0]
        assert budget.num_image_tokens == budget.num_patches // 4
        assert budget.resized_height % 28 == 0 and budget.resized_width % 28 == 0


def test_qwen_budget_hand_value():
    b = qwen_pixel_budget(840, 840)
    # 840 = 30 * 28: kept; 60 x 60 patches of 14 px, 900 tokens after the 2x2 merge.
    assert (b.resized_height, b.resized_width, b.grid_thw, b.num_image_tokens) == (840, 840, (1, 60, 60), 900)
    with pytest.raises(ValueError):
        qwen_pixel_budget(10, 10, min_pixels=100, max_pixels=50)
