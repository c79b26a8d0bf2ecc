"""The synthetic grounding generator: determinism, geometry of boxes/points/masks, and answers that
score the full VisionReasoner reward."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from visurf_megatron.data.gt_style import NOTHINK_COMPACT, THINK_COMPACT, THINK_SPACED, render_ground_truth
from visurf_megatron.data.samples import load_samples

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_grounding.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_grounding", TOOL)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

SMALL = dict(train=12, val=4, size=112, no_object_fraction=0.25, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    res = gen.generate(out, seed=7, **SMALL)
    return out, res


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_another_seed_differs(data, tmp_path):
    out, _ = data
    gen.generate(tmp_path / "b", seed=7, **SMALL)
    gen.generate(tmp_path / "c", seed=8, **SMALL)
    a, b, c = _files(out), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 + 2 * 16 and a == b
    assert set(a) == set(c)
    assert a["train.jsonl"] != c["train.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == 16  # every image differs


def test_schema_counts_and_no_object_rows(data):
    out, res = data
    assert res["counts"]["train"]["no_object"] == 3 and res["counts"]["val"]["no_object"] == 1
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert list(rows[0]) == ["id", "task", "problem", "solution", "image", "img_height", "img_width",
                             "mask", "query_type", "split"]
    assert rows[0]["id"] == "train_000000" and rows[0]["image"] == "images/train/000000.png"
    assert {r["query_type"] for r in rows} == {"single", "multi", "position", "no_object"}
    for r in rows:
        assert (r["img_width"], r["img_height"]) == (112, 112)
        if r["query_type"] == "no_object":
            assert r["solution"] == []
            assert not np.asarray(Image.open(out / r["mask"])).any()
        elif r["query_type"] == "multi":
            assert r["problem"].startswith("all ") and len(r["solution"]) >= 2
        else:
            assert r["problem"].startswith("the ") and len(r["solution"]) == 1
    # The loader accepts it as is.
    assert len(load_samples(out / "train.jsonl")) == 12 and len(load_samples(out / "val.jsonl")) == 4


def test_boxes_points_and_masks_agree(data):
    out, _ = data
    for s in list(load_samples(out / "train.jsonl")) + list(load_samples(out / "val.jsonl")):
        mask = s.load_mask()
        img = np.asarray(s.load_image())
        labels, n = ndimage.label(mask)
        assert n == len(s.solution)  # shapes never touch: one component per referred object
        for obj in s.solution:
            x1, y1, x2, y2 = obj["bbox_2d"]
            px, py = obj["point_2d"]
            comp = labels == labels[py, px]
            assert labels[py, px] > 0  # the point is inside the object
            ys, xs = np.nonzero(comp)
            assert [xs.min(), ys.min(), xs.max(), ys.max()] == [x1, y1, x2, y2]  # tight inclusive box
            # The point is the deepest pixel: as far from the background as any pixel of the object.
            dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
            assert dist[py, px] == dist.max()
            if s.meta["query_type"] == "single":
                colour = s.problem.split()[1]
                assert tuple(img[py, px]) == gen.COLORS[colour]


def test_position_queries_pick_the_extreme_object(data):
    out, _ = data
    checked = 0
    for s in load_samples(out / "train.jsonl"):
        if s.meta["query_type"] != "position":
            continue
        direction, shape = s.problem.split()[1:]
        img = np.asarray(s.load_image()).astype(int)
        bg = np.all(img == gen.BACKGROUND, axis=-1)
        labels, n = ndimage.label(~bg)
        (target,) = s.solution
        centres = []
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            fill = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
            # Squares fill their box, circles about pi/4, triangles about 1/2.
            kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            if kind == shape:
                centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
        axis = 0 if direction in ("leftmost", "rightmost") else 1
        pick = min if direction in ("leftmost", "topmost") else max
        ex = pick(centres, key=lambda c: c[axis])
        x1, y1, x2, y2 = target["bbox_2d"]
        assert ex == ((x1 + x2) / 2, (y1 + y2) / 2)
        checked += 1
    assert checked >= 2


def test_zero_no_object_fraction_and_cli(tmp_path):
    res = gen.generate(tmp_path / "base", train=6, val=0, size=64, seed=1, no_object_fraction=0.0, progress=False)
    assert "no_object" not in res["counts"]["train"] and sum(res["counts"]["train"].values()) == 6
    assert all(s.solution for s in load_samples(tmp_path / "base" / "train.jsonl"))
    assert gen.main(["--out", str(tmp_path / "cli"), "--train", "3", "--val", "1", "--size", "64",
                     "--query-types", "single,multi", "--no-progress"]) == 0
    assert len((tmp_path / "cli" / "train.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        gen.main(["--out", str(tmp_path / "bad"), "--no-object-fraction", "1.5"])
    with pytest.raises(SystemExit):
        gen.main(["--out", str(tmp_path / "bad"), "--query-types", "single,diagonal"])


def test_generated_answers_score_the_maximum_reward(data):
    from visurf_megatron.rewards.grounding import vision_reasoner_reward

    out, _ = data
    samples = list(load_samples(out / "train.jsonl")) + list(load_samples(out / "val.jsonl"))
    assert any(not s.solution for s in samples)  # no-object samples are part of the check
    for s in samples:
        for style in (THINK_COMPACT, THINK_SPACED):
            r = vision_reasoner_reward(render_ground_truth(s, style), s.solution)
            assert (r.thinking, r.answer_format, r.accuracy, r.non_repeat, r.total) == (1, 2, 3, 1, 7), (s.id, style)
        # As the GT row (control 2) the thinking term is zeroed; without a think block it is 0 anyway.
        assert vision_reasoner_reward(render_ground_truth(s, THINK_COMPACT), s.solution,
                                      is_ground_truth=True).total == 6
        assert vision_reasoner_reward(render_ground_truth(s, NOTHINK_COMPACT), s.solution).total == 6


def test_object_frac_sets_the_object_sizes(tmp_path):
    """Box sides follow --object-frac (shapes fill their square's side); bad ranges are refused."""
    gen.generate(tmp_path / "big", train=10, val=0, size=100, seed=3, no_object_fraction=0.0,
                 query_types=("single",), max_objects=3, object_frac=(0.3, 0.4), progress=False)
    sides = [max(b[2] - b[0], b[3] - b[1]) + 1 for s in load_samples(tmp_path / "big" / "train.jsonl")
             for b in (o["bbox_2d"] for o in s.solution)]
    assert sides and all(28 <= d <= 40 for d in sides), sides
    with pytest.raises(ValueError, match="object_frac"):
        gen.generate(tmp_path / "bad", train=1, val=0, size=100, object_frac=(0.4, 0.3), progress=False)
    assert gen.main(["--out", str(tmp_path / "cli"), "--train", "2", "--val", "0", "--size", "64",
                     "--object-frac", "0.25", "0.3", "--no-progress"]) == 0
    with pytest.raises(SystemExit):
        gen.main(["--out", str(tmp_path / "bad2"), "--object-frac", "0", "0.3"])


def test_absent_colour_keeps_the_named_colour_out_of_the_image(tmp_path):
    """absent="colour": a no-object query's colour is drawn nowhere; "combo" only avoids the pair."""
    gen.generate(tmp_path / "c", train=12, val=0, size=64, seed=5, no_object_fraction=1.0, absent="colour",
                 progress=False)
    for s in load_samples(tmp_path / "c" / "train.jsonl"):
        colour = s.problem.split()[1]
        img = np.asarray(Image.open(s.image).convert("RGB")).reshape(-1, 3)
        assert not (img == np.array(gen.COLORS[colour], np.uint8)).all(-1).any(), s.problem
    with pytest.raises(ValueError, match="absent"):
        gen.generate(tmp_path / "bad", train=1, val=0, size=64, absent="shape", progress=False)
