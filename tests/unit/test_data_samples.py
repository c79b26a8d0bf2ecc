"""Loading and validating dataset records from JSONL, Parquet and `datasets` directories."""
import io
import json

import pytest
from PIL import Image

from visurf_megatron.data.samples import (DataValidationError, Sample, load_samples, save_samples_jsonl)

SOL = [{"bbox_2d": [1, 2, 30, 40], "point_2d": [10, 20]}]


def _png(w=8, h=6, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def imgdir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(_png(8, 6))
    (d / "b.png").write_bytes(_png(12, 10, (0, 0, 255)))
    return d


def test_jsonl_loads_and_resolves_paths(tmp_path, imgdir):
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "x1", "problem": "the red car", "solution": SOL, "image": "imgs/a.png",
         "img_height": 480, "img_width": 640, "extra": 5},
        "",  # blank lines are ignored but still count as lines
        {"id": 7, "problem": "all dogs", "solution": json.dumps([]), "image": "imgs/b.png"},
    ])
    res = load_samples(f)
    assert res.skipped == 0 and len(res) == 2
    a, b = res.samples
    assert a == Sample(id="x1", task="grounding", image=str(imgdir / "a.png"), problem="the red car",
                       solution=SOL, img_width=640, img_height=480, meta={"extra": 5})
    # Without a size in the row, it is read from the image; the id becomes a string.
    assert (b.id, b.solution, b.img_width, b.img_height) == ("7", [], 12, 10)
    assert b.load_image().size == (12, 10)


def test_image_root_overrides_file_directory(tmp_path, imgdir):
    f = _write_jsonl(tmp_path / "sub.jsonl", [{"id": "a", "problem": "q", "solution": SOL, "image": "a.png"}])
    assert load_samples(f, image_root=imgdir)[0].image == str(imgdir / "a.png")
    with pytest.raises(DataValidationError, match="row 1: image: file not found"):
        load_samples(f)


def test_visionreasoner_parquet_layout_keeps_bytes_in_memory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = _png(20, 10)
    table = pa.table({
        "id": ["r0", "r1"],
        "problem": ["the cat", "the dog"],
        # The authors' layout: solution as a JSON string, image as an HF Image struct.
        "solution": [json.dumps(SOL), '[{"bbox_2d": [0, 0, 5, 5], "point_2d": [2.5, 3]}]'],
        "image": [{"bytes": img, "path": "orig0.jpg"}, {"bytes": img, "path": None}],
        "img_height": [480, 500],
        "img_width": [640, 600],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    res = load_samples(tmp_path / "d.parquet")
    s0, s1 = res.samples
    assert s0.image is None and s0.image_bytes == img
    assert s0.solution == SOL and (s0.img_width, s0.img_height) == (640, 480)
    assert s1.solution == [{"bbox_2d": [0, 0, 5, 5], "point_2d": [2.5, 3]}]
    assert s0.load_image().size == (20, 10)

    cached = load_samples(tmp_path / "d.parquet", image_cache_dir=tmp_path / "cache")
    paths = {s.image for s in cached}
    assert len(paths) == 1  # same bytes, one file named by content hash
    (p,) = paths
    assert p.startswith(str(tmp_path / "cache")) and open(p, "rb").read() == img
    assert all(s.image_bytes is None for s in cached)


def test_datasets_save_to_disk_with_image_feature(tmp_path):
    import datasets

    feats = datasets.Features({"id": datasets.Value("string"), "problem": datasets.Value("string"),
                               "solution": datasets.Value("string"), "image": datasets.Image(),
                               "img_height": datasets.Value("int32"), "img_width": datasets.Value("int32")})
    data = {"id": ["a", "b"], "problem": ["p1", "p2"], "solution": [json.dumps(SOL), "[]"],
            "image": [{"bytes": _png(9, 7), "path": None}] * 2, "img_height": [70, 70], "img_width": [90, 90]}
    ds = datasets.Dataset.from_dict(data, features=feats)
    ds.save_to_disk(str(tmp_path / "flat"))
    res = load_samples(tmp_path / "flat")
    assert [s.id for s in res] == ["a", "b"]
    assert res[1].solution == [] and res[0].load_image().size == (9, 7)

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="pass split="):
        load_samples(tmp_path / "dd")
    assert len(load_samples(tmp_path / "dd", split="test")) == 1
    # An in-memory Dataset works too.
    assert len(load_samples(ds)) == 2


BAD_ROWS = [
    {"id": "ok1", "problem": "q", "solution": SOL, "image": "imgs/a.png"},
    {"id": "b1", "problem": "q", "solution": [{"bbox_2d": [1, 2, 3], "point_2d": [1, 1]}], "image": "imgs/a.png"},
    {"id": "b2", "problem": "", "solution": SOL, "image": "imgs/a.png"},
    '{"id": "b3", "problem": ',
    {"id": "ok2", "problem": "q", "solution": SOL, "image": "imgs/b.png"},
    {"id": "b4", "problem": "q", "solution": [{"bbox_2d": [5, 5, 1, 1], "point_2d": [1, 1]}], "image": "imgs/a.png"},
    {"id": "b5", "problem": "q", "solution": [{"bbox_2d": [1, 2, 3, 4]}], "image": "imgs/a.png"},
    {"id": "ok1", "problem": "q", "solution": SOL, "image": "imgs/a.png"},
    {"id": "b7", "problem": "q", "solution": SOL, "image": "imgs/a.png", "task": "segmentation"},
    {"id": "b8", "problem": "q", "solution": "not json", "image": "imgs/a.png"},
    {"id": "b9", "problem": "q", "solution": [{"bbox_2d": [1, 2, 3, True], "point_2d": [1, 1]}],
     "image": "imgs/a.png"},
]


def test_bad_rows_error_names_the_row(tmp_path, imgdir):
    f = _write_jsonl(tmp_path / "d.jsonl", BAD_ROWS)
    with pytest.raises(DataValidationError) as e:
        load_samples(f)
    assert str(e.value).startswith("row 2: solution: bbox_2d must be 4 numbers")
    assert e.value.row == 2


def test_bad_rows_skip_counts_and_reasons(tmp_path, imgdir):
    res = load_samples(_write_jsonl(tmp_path / "d.jsonl", BAD_ROWS), on_bad_row="skip")
    assert [s.id for s in res] == ["ok1", "ok2"]
    assert res.skipped == 9
    rows = [r for r, _ in res.skipped_reasons]
    assert rows == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    reasons = dict(res.skipped_reasons)
    assert reasons[3] == "problem: missing or empty"
    assert reasons[4].startswith("not valid JSON")
    assert "x1<=x2" in reasons[6]
    assert reasons[7] == "solution[0]: point_2d missing"
    assert reasons[8] == "id: 'ok1' duplicates row 1"
    assert reasons[9].startswith("task: unknown 'segmentation'")
    assert reasons[10].startswith("solution: not valid JSON")
    assert reasons[11].startswith("solution: bbox_2d must be 4 numbers")  # a bool is no coordinate


def test_missing_and_corrupt_images_are_reported(tmp_path, imgdir):
    (imgdir / "trunc.png").write_bytes(_png(64, 64)[:40])
    (imgdir / "junk.png").write_bytes(b"definitely not an image")
    rows = [
        {"id": "ok", "problem": "q", "solution": SOL, "image": "imgs/a.png"},
        {"id": "missing", "problem": "q", "solution": SOL, "image": "imgs/nope.png"},
        {"id": "trunc", "problem": "q", "solution": SOL, "image": "imgs/trunc.png"},
        {"id": "junk", "problem": "q", "solution": SOL, "image": "imgs/junk.png"},
        {"id": "noimg", "problem": "q", "solution": SOL},
        {"id": "badmask", "problem": "q", "solution": SOL, "image": "imgs/a.png", "mask": "imgs/nomask.png"},
    ]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"row 2: image: file not found: .*nope\.png"):
        load_samples(f)
    res = load_samples(f, on_bad_row="skip")
    assert [s.id for s in res] == ["ok"]
    reasons = dict(res.skipped_reasons)
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert reasons[3].startswith("image: cannot read") and "trunc.png" in reasons[3]
    assert reasons[4].startswith("image: cannot read") and "junk.png" in reasons[4]
    assert reasons[5] == "image: required for task grounding"
    assert reasons[6].startswith("mask: file not found")


def test_corrupt_embedded_bytes_reported(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "problem": ["q"], "solution": [json.dumps(SOL)],
                             "image": [{"bytes": b"\x89PNG broken", "path": None}]}), tmp_path / "d.parquet")
    with pytest.raises(DataValidationError, match="row 1: image: embedded bytes are not a readable image"):
        load_samples(tmp_path / "d.parquet")


def test_other_tasks_validate_their_answers(tmp_path, imgdir):
    rows = [
        {"id": "m", "task": "math", "problem": "1+1?", "solution": 2, "choices": ["1", "2"]},
        {"id": "g", "task": "gui", "problem": "click ok", "solution": [1, 2, 30, 40], "image": "imgs/a.png"},
        {"id": "d", "task": "docvqa", "problem": "date?", "solution": ["1999", "1999."], "image": "imgs/a.png"},
        {"id": "an", "task": "anomaly", "problem": "screw", "solution": True, "image": "imgs/a.png"},
        {"id": "bad", "task": "gui", "problem": "click", "solution": [[1, 2]], "image": "imgs/a.png"},
        {"id": "bad2", "task": "math", "problem": "?", "solution": "  "},
    ]
    res = load_samples(_write_jsonl(tmp_path / "d.jsonl", rows), on_bad_row="skip")
    by_id = {s.id: s for s in res}
    assert by_id["m"].solution == "2" and by_id["m"].choices == ["1", "2"] and by_id["m"].image is None
    assert by_id["g"].solution == [1, 2, 30, 40]
    assert by_id["d"].solution == ["1999", "1999."]
    assert by_id["an"].solution == "yes"
    assert dict(res.skipped_reasons) == {5: "solution[0]: must be an object with bbox_2d and point_2d",
                                         6: "solution: empty"}
    # The task argument is the default for rows without one.
    f = _write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "problem": "2+2", "solution": "4"}])
    assert load_samples(f, task="math")[0].task == "math"


def test_save_and_reload_roundtrip(tmp_path, imgdir):
    s1 = Sample(id="a", task="grounding", image=str(imgdir / "a.png"), problem="q", solution=SOL,
                img_width=8, img_height=6, meta={"query_type": "single"})
    s2 = Sample(id="b", task="grounding", image=None, image_bytes=_png(5, 4), problem="q2", solution=[],
                img_width=5, img_height=4)
    out = save_samples_jsonl([s1, s2], tmp_path / "out" / "set.jsonl")
    first = json.loads(out.read_text().splitlines()[0])
    assert list(first) == ["id", "task", "problem", "solution", "image", "img_height", "img_width", "query_type"]
    assert first["image"] == str(imgdir / "a.png")  # outside the output dir: kept absolute
    second = json.loads(out.read_text().splitlines()[1])
    assert second["image"].startswith("set_images/")  # bytes written next to the JSONL, path relative
    back = load_samples(out)
    assert back[0] == s1
    assert back[1].load_image().size == (5, 4) and back[1].solution == []
