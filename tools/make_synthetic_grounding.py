#!/usr/bin/env python
"""Synthetic referring-grounding data: coloured shapes on a plain background, with single-object,
multi-object, positional and no-object queries, in the dataset schema ``data/samples.py`` loads.

Output layout (``--out DIR``)::

    DIR/train.jsonl, DIR/val.jsonl
    DIR/images/<split>/<index>.png      RGB, size x size
    DIR/masks/<split>/<index>.png       L, 255 on the union of the referred objects (all 0: no object)

One JSONL row per image (key order fixed, paths relative to DIR)::

    {"id": "train_000003", "task": "grounding", "problem": "all blue squares",
     "solution": [{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y]}, ...],   # [] for no object
     "image": "images/train/000003.png", "img_height": 112, "img_width": 112,
     "mask": "masks/train/000003.png", "query_type": "multi", "split": "train"}

Boxes are tight inclusive-pixel boxes of each object's mask; the point is the argmax of the mask's
Euclidean distance transform (the pixel deepest inside the object, as the authors derive points).
Shapes never touch (a gap of at least 2 px), so masks and boxes are unambiguous. Everything follows
from ``--seed``: each image draws from its own generator seeded by (seed, split, index), so the same
seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

from visurf_megatron.data.samples import Sample, save_samples_jsonl

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (50, 165, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 70, 185),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
QUERY_TYPES = ("single", "multi", "position")  # no-object queries are set by their own fraction
DIRECTIONS = ("leftmost", "rightmost", "topmost", "bottommost")
BACKGROUND = (242, 242, 238)
SPLIT_CODES = {"train": 0, "val": 1}
MIN_SIZE = 48
OBJECT_FRAC = (0.08, 0.16)  # object side as a fraction of the image side (default range)
ABSENT_MODES = ("combo", "colour")  # what a no-object query's absence means (see _plan)


class _Retry(Exception):
    """The scene could not satisfy its query (no room, or an ambiguous extreme): draw again."""


def _shape_mask(shape: str, d: int) -> np.ndarray:
    """A d x d boolean stencil of the shape, sampled at pixel centres."""
    yy, xx = np.mgrid[0:d, 0:d].astype(float)
    c = (d - 1) / 2
    if shape == "square":
        return np.ones((d, d), bool)
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= (d / 2) ** 2
    if shape == "triangle":  # apex up, base on the bottom row
        return np.abs(xx - c) <= (yy + 1) / 2
    raise ValueError(shape)


def _place(rng: np.random.Generator, sizes: list[int], size: int, gap: int) -> list[tuple[int, int]]:
    """Top-left corners of non-touching d x d squares (rejection sampling)."""
    placed: list[tuple[int, int, int]] = []
    for d in sizes:
        for _ in range(200):
            x0 = int(rng.integers(gap, size - d - gap + 1))
            y0 = int(rng.integers(gap, size - d - gap + 1))
            if all(x0 + d + gap <= px or px + pd + gap <= x0 or y0 + d + gap <= py or py + pd + gap <= y0
                   for px, py, pd in placed):
                placed.append((x0, y0, d))
                break
        else:
            raise _Retry()
    return [(x, y) for x, y, _ in placed]


def _plan(rng: np.random.Generator, qtype: str, n_min: int, n_max: int, absent: str = "combo"):
    """(objects as (colour, shape), query text, indices of referred objects, direction or None).
    ``absent`` (no-object queries): "combo" draws the other objects from every other colour-shape
    pair (the named colour may be there on another shape); "colour" keeps the named colour out of the
    image altogether."""
    colors, combos = list(COLORS), [(c, s) for c in COLORS for s in SHAPES]

    def other_combos(exclude, k):
        pool = [cs for cs in combos if cs not in exclude]
        return [pool[int(i)] for i in rng.integers(0, len(pool), size=k)]

    if qtype == "single":
        target = combos[int(rng.integers(len(combos)))]
        n = int(rng.integers(max(2, n_min), n_max + 1))
        objs = [target] + other_combos({target}, n - 1)
        return objs, f"the {target[0]} {target[1]}", [0], None
    if qtype == "multi":
        target = combos[int(rng.integers(len(combos)))]
        k = int(rng.integers(2, min(3, n_max - 1) + 1))
        n = int(rng.integers(max(k + 1, n_min), n_max + 1))
        objs = [target] * k + other_combos({target}, n - k)
        return objs, f"all {target[0]} {PLURAL[target[1]]}", list(range(k)), None
    if qtype == "position":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        k = int(rng.integers(2, min(3, n_max - 1) + 1))
        n = int(rng.integers(max(k + 1, n_min), n_max + 1))
        same = [(colors[int(i)], shape) for i in rng.integers(0, len(colors), size=k)]
        objs = same + other_combos({(c, shape) for c in colors}, n - k)
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        return objs, f"the {direction} {shape}", list(range(k)), direction
    if qtype == "no_object":
        missing = combos[int(rng.integers(len(combos)))]
        n = int(rng.integers(max(1, n_min), n_max + 1))
        objs = other_combos({missing} if absent == "combo" else {(missing[0], s) for s in SHAPES}, n)
        text = (f"the {missing[0]} {missing[1]}" if rng.random() < 0.5
                else f"all {missing[0]} {PLURAL[missing[1]]}")
        return objs, text, [], None
    raise ValueError(f"unknown query type {qtype!r}")


def _object_box_point(mask: np.ndarray) -> tuple[list[int], list[int]]:
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    # Pad by one so that the border counts as outside: the distance transform measures to zeros.
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    py, px = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first maximum: deterministic
    return box, [int(px), int(py)]


def object_geometry(size: int, object_frac: tuple[float, float] = OBJECT_FRAC) -> tuple[int, int, int]:
    """(smallest object side, largest object side, gap between objects and to the border) in pixels."""
    lo = max(8, round(object_frac[0] * size))
    return lo, max(lo + 1, round(object_frac[1] * size)), max(2, size // 40)


def split_dirs(out: Path, split: str) -> None:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "masks" / split).mkdir(parents=True, exist_ok=True)


def write_scene(out: Path, split: str, i: int, img: np.ndarray, mask: np.ndarray, query: str,
                solution: list, qtype: str) -> Sample:
    """Save image ``i`` of ``split`` and its mask as PNGs under ``out``; the sample that describes them."""
    img_path = out / "images" / split / f"{i:06d}.png"
    mask_path = out / "masks" / split / f"{i:06d}.png"
    Image.fromarray(img, "RGB").save(img_path, format="PNG")
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path, format="PNG")
    size = img.shape[0]
    return Sample(id=f"{split}_{i:06d}", task="grounding", image=str(img_path), problem=query, solution=solution,
                  img_width=size, img_height=size, mask=str(mask_path), meta={"query_type": qtype, "split": split})


def make_scene(rng: np.random.Generator, qtype: str, size: int, *, min_objects: int = 2,
               max_objects: int = 6, object_frac: tuple[float, float] = OBJECT_FRAC, absent: str = "combo"):
    """One image: returns (rgb uint8 array, union mask of referred objects, query, solution).
    Objects are squares of side ``object_frac`` x ``size`` (at least 8 px) holding their shape."""
    lo, hi, gap = object_geometry(size, object_frac)
    for _ in range(100):
        try:
            objs, query, referred, direction = _plan(rng, qtype, min_objects, max_objects, absent)
            sizes = [int(d) for d in rng.integers(lo, hi + 1, size=len(objs))]
            corners = _place(rng, sizes, size, gap)
            if direction is not None:
                axis = 0 if direction in ("leftmost", "rightmost") else 1
                sign = -1 if direction in ("leftmost", "topmost") else 1
                # Rank by centre and by the far edge: both must name the same winner, each by more
                # than the gap, or "the leftmost" is a judgement call.
                winners = set()
                for edge in ((sizes[i] - 1) / 2 for i in referred), (
                        (0 if sign < 0 else sizes[i] - 1) for i in referred):
                    keys = [sign * (corners[i][axis] + e) for i, e in zip(referred, edge)]
                    order = np.argsort(keys)[::-1]
                    if keys[order[0]] - keys[order[1]] <= gap:
                        raise _Retry()
                    winners.add(int(order[0]))
                if len(winners) != 1:
                    raise _Retry()
                referred = [referred[winners.pop()]]
            break
        except _Retry:
            continue
    else:
        raise RuntimeError(f"could not build a {qtype!r} scene at size {size}; lower --max-objects")

    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    union = np.zeros((size, size), bool)
    solution = []
    for i, ((color, shape), d, (x0, y0)) in enumerate(zip(objs, sizes, corners)):
        full = np.zeros((size, size), bool)
        full[y0:y0 + d, x0:x0 + d] = _shape_mask(shape, d)
        img[full] = COLORS[color]
        if i in referred:
            union |= full
            box, point = _object_box_point(full)
            solution.append({"bbox_2d": box, "point_2d": point})
    solution.sort(key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0]))
    return img, union, query, solution


def _type_plan(n: int, no_object_fraction: float, query_types, rng: np.random.Generator) -> list[str]:
    n_none = int(round(n * no_object_fraction))
    rest = n - n_none
    if rest and not query_types:
        raise ValueError("no query types left for images with objects")
    plan = ["no_object"] * n_none + [query_types[i % len(query_types)] for i in range(rest)]
    return [plan[int(i)] for i in rng.permutation(n)]


def generate(out_dir, *, train: int = 200, val: int = 50, size: int = 840, seed: int = 0,
             no_object_fraction: float = 0.2, query_types=QUERY_TYPES, min_objects: int = 2,
             max_objects: int = 6, object_frac: tuple[float, float] = OBJECT_FRAC, absent: str = "combo",
             progress: bool = True) -> dict:
    """Write the dataset under ``out_dir``; returns {"train": jsonl path, "val": ..., "counts": ...}."""
    from tqdm import tqdm

    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if not 0.0 <= no_object_fraction <= 1.0:
        raise ValueError(f"no_object_fraction must be in [0, 1], got {no_object_fraction}")
    if train < 0 or val < 0:
        raise ValueError("train and val counts must be >= 0")
    if not 1 <= min_objects <= max_objects or max_objects < 3:
        raise ValueError("need 1 <= min_objects <= max_objects and max_objects >= 3")
    if absent not in ABSENT_MODES:
        raise ValueError(f"absent must be one of {ABSENT_MODES}, got {absent!r}")
    if not 0.0 < object_frac[0] <= object_frac[1] <= 0.5:
        raise ValueError(f"object_frac must satisfy 0 < low <= high <= 0.5, got {object_frac}")
    query_types = tuple(query_types)
    for q in query_types:
        if q not in QUERY_TYPES:
            raise ValueError(f"unknown query type {q!r} (choose from {', '.join(QUERY_TYPES)})")

    out = Path(out_dir)
    result: dict = {"counts": {}}
    bar = tqdm(total=train + val, desc="synthetic grounding", unit="img", disable=not progress)
    for split, n in (("train", train), ("val", val)):
        code = SPLIT_CODES[split]
        split_dirs(out, split)
        types = _type_plan(n, no_object_fraction, query_types, np.random.default_rng([seed, code, 1 << 30]))
        samples, counts = [], {}
        for i, qtype in enumerate(types):
            rng = np.random.default_rng([seed, code, i])
            img, mask, query, solution = make_scene(rng, qtype, size, min_objects=min_objects,
                                                    max_objects=max_objects, object_frac=object_frac, absent=absent)
            samples.append(write_scene(out, split, i, img, mask, query, solution, qtype))
            counts[qtype] = counts.get(qtype, 0) + 1
            bar.update(1)
        result[split] = save_samples_jsonl(samples, out / f"{split}.jsonl")
        result["counts"][split] = counts
    bar.close()
    return result


def _parse_types(text: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in types if t not in QUERY_TYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown query type(s) {bad}; choose from {', '.join(QUERY_TYPES)}")
    return types


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Generate a deterministic synthetic referring-grounding dataset (coloured shapes, "
                    "boxes, interior points, masks, no-object queries) as JSONL + PNG.")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--train", type=int, default=200, help="number of training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="number of validation images (default 50)")
    p.add_argument("--size", type=int, default=840,
                   help=f"square image side in pixels (default 840, the paper's frame; >= {MIN_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed = byte-identical output")
    p.add_argument("--no-object-fraction", type=float, default=0.2,
                   help="fraction of images per split whose query names an absent object (solution []); "
                        "0 makes a base split without any (default 0.2)")
    p.add_argument("--query-types", type=_parse_types, default=QUERY_TYPES,
                   help="comma-separated query types for images with targets "
                        f"(default {','.join(QUERY_TYPES)})")
    p.add_argument("--min-objects", type=int, default=2, help="fewest shapes per image (default 2)")
    p.add_argument("--max-objects", type=int, default=6, help="most shapes per image (default 6, >= 3)")
    p.add_argument("--object-frac", type=float, nargs=2, default=OBJECT_FRAC, metavar=("LOW", "HIGH"),
                   help="object side as a fraction of the image side, drawn uniformly in [LOW, HIGH] "
                        f"(at least 8 px; default {OBJECT_FRAC[0]} {OBJECT_FRAC[1]})")
    p.add_argument("--absent", choices=ABSENT_MODES, default="combo",
                   help="no-object queries: 'combo' = that colour-shape pair is absent (the colour may be there "
                        "on another shape), 'colour' = the colour is absent from the image (default combo)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    try:
        res = generate(a.out, train=a.train, val=a.val, size=a.size, seed=a.seed,
                       no_object_fraction=a.no_object_fraction, query_types=a.query_types,
                       min_objects=a.min_objects, max_objects=a.max_objects, object_frac=tuple(a.object_frac),
                       absent=a.absent,
                       progress=not a.no_progress)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {res['train']} and {res['val']}; query types: {res['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
