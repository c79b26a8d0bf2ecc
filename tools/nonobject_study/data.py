"""The study's data: synthetic grounding splits (base, study, one-object warm-up scenes), the
shaded background that gives the tiny model absolute position, and the tiny random model."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .design import Profile


def shade_background(root: str | Path, background=(242, 242, 238), strength: int = 70, halo: int = 0) -> int:
    """Paint position into the images: background pixels take a ramp colour, red falling with x and
    green with y (255 -> 255 - strength), blue fixed. With ``halo`` > 0 only the background within
    ``halo`` pixels of an object is painted and the rest keeps the plain colour, so the position sits
    in the object's own image tokens. Objects are untouched (the generator draws hard-edged shapes,
    so a pixel is either exactly the background colour or an object's). Returns the number of
    images rewritten."""
    import numpy as np
    from PIL import Image

    bg = np.array(background, np.uint8)
    count = 0
    for path in sorted(Path(root).glob("images/*/*.png")):
        img = np.asarray(Image.open(path).convert("RGB")).copy()
        h, w, _ = img.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(float)
        ramp = np.stack([255 - strength * xx / max(w - 1, 1), 255 - strength * yy / max(h - 1, 1),
                         np.full((h, w), 240.0)], -1).round().astype(np.uint8)
        mask = np.all(img == bg, axis=-1)
        if halo > 0:
            mask &= _dilate(~mask, halo)
        img[mask] = ramp[mask]
        Image.fromarray(img, "RGB").save(path, format="PNG")
        count += 1
    return count


def _dilate(mask, r: int):
    """Square dilation of a boolean image by ``r`` pixels (numpy only)."""
    import numpy as np

    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def unify_no_object_wording(jsonl: str | Path) -> int:
    """No-object queries are drawn as "the red circle" or "all red circles"; the study has only
    single-object queries with targets, so "all ..." would give the absence away. Rewrite them to
    the singular form. Returns the number of rows changed."""
    from tools.make_synthetic_grounding import PLURAL

    singular = {v: k for k, v in PLURAL.items()}
    path = Path(jsonl)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    changed = 0
    for row in rows:
        words = row["problem"].split()
        if row.get("solution") == [] and len(words) == 3 and words[0] == "all" and words[2] in singular:
            row["problem"] = f"the {words[1]} {singular[words[2]]}"
            changed += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return changed


def make_single_object_scenes(out_dir: str | Path, *, train: int, val: int, size: int, seed: int,
                              object_frac: tuple[float, float] = (0.08, 0.16)) -> dict:
    """The base model's curriculum stage: scenes with exactly one object, which the query names
    ("the red circle"). Drawn with the generator's own palette, shapes, size range and box/point
    rules (``tools/make_synthetic_grounding``); written in the same layout (JSONL + PNG + masks)."""
    import numpy as np

    from tools.make_synthetic_grounding import (
        BACKGROUND, COLORS, SHAPES, SPLIT_CODES, _object_box_point, _shape_mask, object_geometry, split_dirs,
        write_scene,
    )
    from visurf_megatron.data.samples import save_samples_jsonl

    out = Path(out_dir)
    lo, hi, gap = object_geometry(size, object_frac)
    result: dict = {"counts": {}}
    for split, n in (("train", train), ("val", val)):
        split_dirs(out, split)
        samples = []
        for i in range(n):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], i, 7])
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            d = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(gap, size - d - gap + 1, size=2))
            img = np.empty((size, size, 3), np.uint8)
            img[:] = BACKGROUND
            mask = np.zeros((size, size), bool)
            mask[y0:y0 + d, x0:x0 + d] = _shape_mask(shape, d)
            img[mask] = COLORS[color]
            box, point = _object_box_point(mask)
            samples.append(write_scene(out, split, i, img, mask, f"the {color} {shape}",
                                       [{"bbox_2d": box, "point_2d": point}], "single_object"))
        result[split] = save_samples_jsonl(samples, out / f"{split}.jsonl")
        result["counts"][split] = {"single_object": n}
    return result


def to_existence_questions(jsonl: str | Path) -> int:
    """Rewrite a grounding split as existence questions about the same scenes and queries: task
    ``existence``, solution "yes" when the named object is there, "no" when it is not (the
    grounding solution ``[]``). Returns the number of rows."""
    path = Path(jsonl)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "mask"}
        row.update(task="existence", solution="no" if row["solution"] == [] else "yes")
        out.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return len(out)


def mix_splits(out: Path, parts: list[tuple[str, Path]], seed: int) -> str:
    """One training file of several splits' rows, image paths made absolute, in a fixed shuffle."""
    import random

    rows = []
    for name, jsonl in parts:
        root = Path(jsonl).parent
        for line in Path(jsonl).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row["id"] = f"{name}_{row['id']}"
                for key in ("image", "mask"):
                    if isinstance(row.get(key), str) and not Path(row[key]).is_absolute():
                        row[key] = str((root / row[key]).resolve())
                rows.append(row)
    random.Random(seed).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "train.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(target)


def make_data(work: Path, profile: Profile) -> dict:
    from tools.make_synthetic_grounding import generate

    info = {}
    # "existence": yes/no questions on scenes drawn like the study split's (half the named objects
    # absent), part of the base model's curriculum: it learns to tell absence, but never to answer
    # a grounding query with [].
    plan = (("warmup", profile.warmup_train, 16, None), ("base", profile.base_train, profile.base_val, 0.0),
            ("study", profile.study_train, profile.study_val, profile.no_object_fraction),
            ("existence", profile.existence_train, profile.existence_val, 0.5))
    for index, (split, train, val, frac) in enumerate(plan):
        out = work / "data" / split
        done = out / "done.json"
        if done.exists():
            info[split] = json.loads(done.read_text())
            continue
        seed = profile.data_seed + index  # different images in every split
        if frac is None:
            res = make_single_object_scenes(out, train=train, val=val, size=profile.data_size, seed=seed,
                                            object_frac=profile.object_frac)
            reworded = 0
        else:
            res = generate(out, train=train, val=val, size=profile.data_size, seed=seed, no_object_fraction=frac,
                           query_types=("single",), max_objects=profile.max_objects,
                           object_frac=profile.object_frac, absent=profile.absent, progress=False)
            reworded = sum(unify_no_object_wording(res[k]) for k in ("train", "val"))
            if split == "existence":
                for k in ("train", "val"):
                    to_existence_questions(res[k])
        shaded = shade_background(out, strength=profile.shade_strength, halo=profile.halo)
        info[split] = {"train": str(res["train"]), "val": str(res["val"]), "counts": res["counts"],
                       "no_object_fraction": frac or 0.0, "seed": seed, "reworded_no_object_queries": reworded,
                       "shaded_images": shaded}
        done.write_text(json.dumps(info[split], indent=2))
    info["base_mix"] = {"train": mix_splits(work / "data" / "base_mix", [("base", Path(info["base"]["train"])),
                                                                         ("existence", Path(info["existence"]["train"]))],
                                            profile.data_seed)}
    # The base model's last stage: mostly existence questions (existence_copies of each), with the base
    # split's grounding rows kept in so that grounding is held while the existence questions are learnt.
    info["existence_mix"] = {"train": mix_splits(
        work / "data" / "existence_mix", [("base", Path(info["base"]["train"]))]
        + [(f"existence{k}", Path(info["existence"]["train"])) for k in range(profile.existence_copies)], profile.data_seed)}
    return info


def make_model(work: Path, profile: Profile) -> Path:
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    hf = work / "hf"
    if not (hf / "config.json").exists():
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            make_tiny_checkpoint(hf, seed=profile.model_seed, init_std=profile.init_std, **dict(profile.model))
    return hf


