"""The evaluation runner end to end on CPU: a tiny random checkpoint and a synthetic grounding set
through ``python -m visurf_megatron.evaluate`` (box masks; SAM2 with random weights), metrics from
hand-made predictions, interrupt-and-resume, a truncated predictions line, prompts == training's,
the benchmark dataset layouts (mask arrays, RLE, polygons, bbox only).

The only fake is ``FakeOracleEngine``, at the GPU boundary (it stands where the vLLM engine would):
it answers with the ground truth so that coordinate mapping and the segmenters see real objects.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from visurf_megatron.data.images import scale_objects  # noqa: E402
from visurf_megatron.eval.datasets import load_eval_items  # noqa: E402
from visurf_megatron.eval.metrics import GroundingMetrics  # noqa: E402
from visurf_megatron.eval.runner import (EvalConfig, EvalError, build_request, read_predictions,  # noqa: E402
                                         run_evaluation)
from visurf_megatron.eval.scoring import grounding_stats, metrics_from_records  # noqa: E402
from visurf_megatron.eval.segmenter import RANDOM_INIT_LABEL, BoxSegmenter, sam2_available  # noqa: E402
from visurf_megatron.evaluate import main  # noqa: E402
from visurf_megatron.rollout.base import Completion  # noqa: E402
from visurf_megatron.rollout.processor import load_processor  # noqa: E402

SQUARE = 112  # the tiny checkpoint's processor keeps it under its pixel budget; 56 -> 112 is a 2x frame
FAST = ["--image-size", str(SQUARE), "--max-new-tokens", "24", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    from tools.make_synthetic_grounding import generate

    return generate(tmp_path_factory.mktemp("eval") / "data", train=0, val=6, size=56, no_object_fraction=0.34,
                    progress=False)["val"]


@pytest.fixture(scope="module")
def full_run(ckpt, val, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "full"
    assert main(["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--segmenter", "box",
                 "--overlays", "2", "--out", str(out)] + FAST) == 0
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_cli_end_to_end_box_segmenter(full_run, val):
    metrics = json.loads((full_run / "metrics.json").read_text())
    rows = [json.loads(line) for line in Path(val).read_text().splitlines()]
    no_target = sum(not r["solution"] for r in rows)
    assert metrics["segmenter"].startswith("box") and metrics["task"] == "grounding"
    recs = _records(full_run)
    assert [r["id"] for r in recs] == [r["id"] for r in rows]
    for r in recs:
        assert r["prompt"].startswith("<|im_start|>system") and "<|image_pad|>" in r["prompt"]
        assert set(r["stats"]) >= {"inter", "union", "iou", "no_target", "pred_empty", "bbox_hit"}
        assert isinstance(r["response"], str) and isinstance(r["objects"], list)
    m = metrics["metrics"]
    assert m["count"] == 6 and m["ciou"] is not None
    # A random tiny model writes no parseable answer: nothing predicted anywhere.
    if m["parse_fail_rate"] == 1.0:
        assert m["giou"] == pytest.approx(no_target / 6) and m["n_acc"] == 1.0 and m["t_acc"] == 0.0
    assert (full_run / "metrics.md").read_text().count("| gIoU |") == 1
    pngs = sorted((full_run / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == ["00000_val_000000.png", "00001_val_000001.png"]
    for p in pngs:
        with Image.open(p) as img:
            img.verify()
    run = json.loads((full_run / "run.json").read_text())
    assert run["invocations"][0]["new_samples"] == 6 and "seconds" in run["invocations"][0]


def test_interrupt_and_resume_gives_the_same_metrics(full_run, ckpt, val, tmp_path):
    out = tmp_path / "resumed"
    args = ["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--segmenter", "box",
            "--overlays", "2", "--out", str(out)] + FAST
    assert main(args + ["--limit", "3"]) == 0
    assert len(_records(out)) == 3 and json.loads((out / "metrics.json").read_text())["metrics"]["count"] == 3
    assert main(args) == 0
    assert (out / "metrics.json").read_bytes() == (full_run / "metrics.json").read_bytes()
    assert _records(out) == _records(full_run)
    assert [i["new_samples"] for i in json.loads((out / "run.json").read_text())["invocations"]] == [3, 3]
    # Settings that change predictions are refused in the same out directory.
    with pytest.raises(EvalError, match="image_size"):
        run_evaluation(EvalConfig(model=str(ckpt), data=str(val), task="grounding", out=str(out), segmenter="box",
                                  image_size=224, max_new_tokens=24, progress=False))


def test_truncated_last_line_is_dropped_and_repredicted(full_run, ckpt, val, tmp_path):
    out = tmp_path / "cut"
    out.mkdir()
    shutil.copy(full_run / "run.json", out / "run.json")
    text = (full_run / "predictions.jsonl").read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    (out / "predictions.jsonl").write_text(text[: last_start + 40])  # a half-written last record
    assert [r["index"] for r in read_predictions(out / "predictions.jsonl")] == [0, 1, 2, 3, 4]
    assert main(["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--segmenter", "box",
                 "--overlays", "0", "--out", str(out)] + FAST) == 0
    assert (out / "predictions.jsonl").read_text() == text
    assert (out / "metrics.json").read_bytes() == (full_run / "metrics.json").read_bytes()


def test_metrics_from_hand_made_predictions(tmp_path):
    """Four samples on a 10x10 image; boxes are inclusive pixels.

    A (target)    GT rows/cols 0-3 (16 px); pred [0,0,1,3] (8 px)  -> I=8, U=16, IoU 1/2; box IoU 0.5, not > 0.5
    B (target)    GT rows/cols 2-5 (16 px); pred [4,4,7,7] (16 px) -> I=4 (rows/cols 4-5), U=28, IoU 1/7; box miss
    C (no target) predicted []                                     -> I=0, U=0, IoU 1 (N correct); bbox correct
    D (no target) pred [0,0,2,1] (3x2 = 6 px)                       -> I=0, U=6, IoU 0 (N wrong); bbox wrong
    gIoU = (1/2 + 1/7 + 1 + 0) / 4 = 23/56; cIoU = (8+4+0+0) / (16+28+0+6) = 12/50 = 0.24
    N-Acc = 1/2; T-Acc = 2/2; bbox acc = 1/4
    """
    def gt(r0, r1):
        m = np.zeros((10, 10), bool)
        m[r0:r1 + 1, r0:r1 + 1] = True
        return m

    cases = [("A", gt(0, 3), [0, 0, 3, 3], [[0, 0, 1, 3]], dict(inter=8, union=16, iou=0.5, bbox_hit=False)),
             ("B", gt(2, 5), [2, 2, 5, 5], [[4, 4, 7, 7]], dict(inter=4, union=28, iou=1 / 7, bbox_hit=False)),
             ("C", np.zeros((10, 10), bool), None, [], dict(inter=0, union=0, iou=1.0, bbox_hit=True)),
             ("D", np.zeros((10, 10), bool), None, [[0, 0, 2, 1]], dict(inter=0, union=6, iou=0.0, bbox_hit=False))]
    lines, reference = [], GroundingMetrics()
    image = Image.new("RGB", (10, 10))
    for index, (sid, gt_mask, gt_box, boxes, hand) in enumerate(cases):
        objects = [{"bbox_2d": b, "point_2d": [b[0], b[1]]} for b in boxes]
        pred_mask = BoxSegmenter().segment(image, objects)
        stats = grounding_stats(objects, pred_mask, gt_mask, [gt_box] if gt_box else [])
        assert {k: stats[k] for k in hand} == pytest.approx(hand)
        reference.update(pred_mask, gt_mask, pred_boxes=boxes, gt_boxes=gt_box or [])
        lines.append(json.dumps({"id": sid, "index": index, "prompt": "p", "response": "r", "objects": objects,
                                 "parse_error": None, "stats": stats}))
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n" + '{"id": "E", "index": 4, "prom')  # + a half-written line
    records = read_predictions(path, repair=True)
    assert [r["id"] for r in records] == ["A", "B", "C", "D"]
    assert path.read_text().endswith("}\n")  # the fragment was cut so that appends continue cleanly
    m = metrics_from_records(records[::-1], "grounding")  # order does not matter
    assert m["giou"] == pytest.approx(23 / 56) and m["ciou"] == pytest.approx(0.24)
    assert m["n_acc"] == 0.5 and m["t_acc"] == 1.0 and m["bbox_acc"] == 0.25 and m["count"] == 4
    ref = reference.compute()
    assert [m[k] for k in ("giou", "ciou", "n_acc", "t_acc", "bbox_acc")] == pytest.approx(
        [ref[k] for k in ("giou", "ciou", "n_acc", "t_acc", "bbox_acc")])


class FakeOracleEngine:
    """FAKE at the GPU boundary (where ``VLLMRolloutEngine`` sits): answers each prompt with its
    ground truth written in the square frame the model was shown, as a perfect policy would."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, requests, sampling):
        assert sampling.greedy and sampling.n == 1
        return [[Completion((), (1,), self.answers[r.prompt], (0.0,), "stop")] for r in requests]


def _oracle(ckpt, val, square):
    processor = load_processor(ckpt)
    answers = {}
    for item in load_eval_items(val, task="grounding"):
        request, stored = build_request(item.sample, processor, image_size=square, prompt_style="detailed",
                                        think=True)
        s = square / stored.size[0]
        objs = scale_objects(item.sample.solution, s, s, to_int=True)
        answers[request.prompt] = f"<think>seen</think><answer>{json.dumps(objs)}</answer>"
    return FakeOracleEngine(answers), processor


def test_oracle_answers_map_back_to_the_original_frame(ckpt, val, tmp_path):
    square = 100  # 56 -> 100: a non-integer scale; rounding both ways must land on the GT pixels
    engine, processor = _oracle(ckpt, val, square)
    # bbox acc in "union" mode: the default ("any" predicted box vs the GT union box, the authors'
    # loop) cannot credit a multi-object GT even when every box is right.
    cfg = EvalConfig(model=str(ckpt), data=str(val), task="grounding", out=str(tmp_path / "o"), segmenter="box",
                     image_size=square, overlays=1, progress=False, bbox_mode="union")
    metrics = run_evaluation(cfg, engine=engine, processor=processor)["metrics"]
    assert metrics["bbox_acc"] == 1.0 and metrics["n_acc"] == 1.0 and metrics["t_acc"] == 1.0
    assert metrics["parse_fail_rate"] == 0.0
    ious = []
    for item, rec in zip(load_eval_items(val, task="grounding"), _records(tmp_path / "o")):
        assert [o["bbox_2d"] for o in rec["objects"]] == [o["bbox_2d"] for o in item.sample.solution]
        assert [o["point_2d"] for o in rec["objects"]] == [o["point_2d"] for o in item.sample.solution]
        gt_mask = item.sample.load_mask()
        box_mask = np.zeros_like(gt_mask)
        for o in item.sample.solution:
            x1, y1, x2, y2 = o["bbox_2d"]
            box_mask[y1:y2 + 1, x1:x2 + 1] = True
        ious.append((gt_mask & box_mask).sum() / (gt_mask | box_mask).sum() if gt_mask.any() else 1.0)
    assert metrics["giou"] == pytest.approx(np.mean(ious))


@pytest.mark.skipif(not sam2_available()[0], reason=sam2_available()[1])
def test_random_sam2_path_runs_on_predicted_objects(ckpt, val, tmp_path):
    engine, processor = _oracle(ckpt, val, SQUARE)
    cfg = EvalConfig(model=str(ckpt), data=str(val), task="grounding", out=str(tmp_path / "s"),
                     sam2_random_init=True, sam2_image_size=256, image_size=SQUARE, overlays=0, progress=False)
    payload = run_evaluation(cfg, engine=engine, processor=processor)
    assert payload["segmenter"] == RANDOM_INIT_LABEL == "sam2 (random init: numbers meaningless)"
    recs = _records(tmp_path / "s")
    targets = [r for r in recs if not r["stats"]["no_target"]]
    assert targets and all(r["objects"] for r in targets)
    assert all(0 <= r["stats"]["inter"] <= r["stats"]["union"] for r in recs)
    assert any(r["stats"]["pred_area"] > 0 for r in targets)  # SAM2 produced masks
    assert all(0.0 <= v <= 1.0 for k, v in payload["metrics"].items() if k != "count" and v is not None)
    # Through the CLI with the tiny checkpoint (its random answers rarely hold objects to prompt SAM2 with).
    out = tmp_path / "cli"
    assert main(["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--sam2-random-init",
                 "--sam2-image-size", "256", "--limit", "2", "--out", str(out)] + FAST) == 0
    cli = json.loads((out / "metrics.json").read_text())
    assert cli["segmenter"] == RANDOM_INIT_LABEL and cli["metrics"]["count"] == 2
    # A missing checkpoint is a clear error; nothing is downloaded.
    assert main(["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--sam2-checkpoint",
                 str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")] + FAST) == 2


def test_prompts_match_the_trainers(ckpt, val):
    from visurf_megatron.training.data_feed import PromptPreparer

    processor = load_processor(ckpt)
    for think in (True, False):
        prep = PromptPreparer(processor, image_size=SQUARE, prompt_style="plain", think=think)
        for item in load_eval_items(val, task="grounding")[:2]:
            request, _ = build_request(item.sample, processor, image_size=SQUARE, prompt_style="plain", think=think)
            ref = prep(item.sample)
            assert request.prompt == ref.text
            assert [np.asarray(i).tolist() for i in request.images] == [np.asarray(i).tolist() for i in ref.images]


def _rle_string(mask: np.ndarray) -> str:
    """COCO compressed RLE (pycocotools' rleToString), written here to test the decoder."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10 == 0 and x == 0) or (c & 0x10 and x == -1))
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_benchmark_layouts(tmp_path):
    """The authors' layout: image, text, mask (array / RLE / polygons / absent), bbox, img sizes."""
    img = tmp_path / "im.png"
    Image.new("RGB", (8, 6), (9, 9, 9)).save(img)
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    rows = [
        {"id": "arr", "image": "im.png", "text": "The thing.", "mask": mask.astype(int).tolist(), "bbox": [2, 1, 6, 3],
         "img_height": 6, "img_width": 8},
        {"id": "rle", "image": "im.png", "text": "x", "mask": {"size": [6, 8], "counts": _rle_string(mask)},
         "bbox": [[2, 1, 6, 3]]},
        {"id": "rle_list", "image": "im.png", "text": "x",  # column-major runs, zeros first
         "mask": {"size": [6, 8], "counts": [13, 3, 3, 3, 3, 3, 3, 3, 3, 3, 8]}},
        {"id": "poly", "image": "im.png", "text": "x", "mask": [[2, 1, 6, 1, 6, 3, 2, 3]]},
        {"id": "box_only", "image": "im.png", "text": "x", "bbox": [2, 1, 6, 3]},
        {"id": "empty", "image": "im.png", "text": "x", "bbox": []},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_eval_items(path, task="grounding")
    for item in items:
        expect = np.zeros_like(mask) if item.id == "empty" else mask
        assert np.array_equal(item.gt_mask((8, 6)), expect), item.id
    assert items[0].sample.problem == "The thing." and items[0].boxes_in_original((8, 6)) == [[2, 1, 6, 3]]
    assert items[2].gt_boxes is None and items[5].gt_boxes == []
    # A mask stored at another size is compared in the original frame (nearest resize).
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"id": "a", "image": "im.png", "text": "x", "img_width": 16, "img_height": 12,
                               "mask": mask.astype(int).tolist()}) + "\n")
    assert load_eval_items(big, task="grounding")[0].gt_mask((8, 6)).sum() == 4 * mask.sum()
    math_path = tmp_path / "math.jsonl"
    math_path.write_text(json.dumps({"id": 1, "text": "1+1?", "answer": "2", "choices": ["1", "2"]}) + "\n")
    assert load_eval_items(math_path, task="math")[0].sample.choices == ["1", "2"]
    with pytest.raises(FileNotFoundError):
        load_eval_items(tmp_path / "missing.jsonl", task="grounding")


def _score(path: Path, task: str, responses: list[str], square: int = 100) -> tuple[list[dict], dict]:
    from visurf_megatron.eval.scoring import score_sample

    records = []
    for item, response in zip(load_eval_items(path, task=task), responses):
        image = item.sample.load_image() if item.sample.has_image else None
        rec, _ = score_sample(item, response, image=image, image_size=square, segmenter=BoxSegmenter())
        records.append({"id": item.id, "index": item.index, "finish_reason": "stop", **rec})
    return records, metrics_from_records(records, task)


def test_gui_anomaly_math_chartqa_docvqa_scoring(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "im.png")

    def write(name, rows):
        (tmp_path / name).write_text("\n".join(json.dumps({"image": "im.png", "text": "q", **r}) for r in rows))
        return tmp_path / name

    # GUI: the square is 100 px, so x is divided by 5 and y by 10 on the way back.
    gui = write("gui.jsonl", [{"id": "hit", "bbox": [10, 0, 19, 9]}, {"id": "miss", "bbox": [10, 0, 19, 9]}])
    recs, m = _score(gui, "gui", ['<answer>[{"bbox_2d": [60, 0, 90, 90], "point_2d": [75, 50]}]</answer>',
                                  '<answer>[{"bbox_2d": [0, 0, 40, 90], "point_2d": [25, 50]}]</answer>'])
    assert recs[0]["objects"] == [{"bbox_2d": [12, 0, 18, 9], "point_2d": [15, 5]}]
    assert [r["stats"]["hit"] for r in recs] == [True, False] and m["accuracy"] == 0.5
    # Anomaly: label from the GT mask; score = predicted mask area / image area.
    defect = np.zeros((10, 20), int)
    defect[2:6, 2:8] = 1
    anomaly = write("anomaly.jsonl", [{"id": "defect", "mask": defect.tolist()},
                                      {"id": "normal_ok", "mask": np.zeros((10, 20), int).tolist()},
                                      {"id": "normal_fp", "mask": np.zeros((10, 20), int).tolist()}])
    recs, m = _score(anomaly, "anomaly", ['<answer>[{"bbox_2d": [10, 20, 40, 60]}]</answer>', "<answer>[]</answer>",
                                          '<answer>[{"bbox_2d": [0, 0, 5, 10]}]</answer>'])
    assert [r["stats"]["label"] for r in recs] == [1, 0, 0] and [r["stats"]["pred_label"] for r in recs] == [1, 0, 1]
    # [10,20,40,60] -> [2,2,8,6]: 7 x 5 inclusive pixels; [0,0,5,10] -> [0,0,1,1]: 2 x 2.
    assert recs[0]["stats"]["score"] == pytest.approx(35 / 200) and recs[2]["stats"]["score"] == pytest.approx(4 / 200)
    assert m["roc_auc"] == 1.0 and m["acc"] == pytest.approx(2 / 3)
    math_path = tmp_path / "math.jsonl"
    math_path.write_text(json.dumps({"id": "m1", "text": "1+1?", "answer": "2"}) + "\n"
                         + json.dumps({"id": "m2", "text": "pick", "answer": "B", "choices": ["3", "4"]}) + "\n")
    _, m = _score(math_path, "math", ["<think>x</think><answer>\\boxed{2}</answer>", "<answer>\\boxed{3}</answer>"])
    assert m["accuracy"] == 0.5
    chart = tmp_path / "chart.jsonl"
    chart.write_text(json.dumps({"id": "c", "query": "how many?", "label": ["10"]}) + "\n")
    _, m = _score(chart, "chartqa", ["<answer>10.3</answer>"])
    assert m["relaxed_acc"] == 1.0  # within 5%
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"id": "d", "question": "what?", "answers": ["hello world", "hi"]}) + "\n")
    recs, m = _score(doc, "docvqa", ["<answer>Hello Word</answer>"])
    assert recs[0]["answer"] == "Hello Word" and m["anls"] == pytest.approx(1 - 1 / 11)


def test_a_qwen2_vl_checkpoint_is_evaluated_by_its_model_type(val, tmp_path):
    """The other family (issue 22): same CLI, no flag; transformers' Qwen2-VL and its processor."""
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "qwen2_vl", seed=0, family="qwen2_vl")
    out = tmp_path / "out"
    assert main(["--model", str(ckpt), "--data", str(val), "--task", "grounding", "--segmenter", "box",
                 "--out", str(out)] + FAST) == 0
    rows = [json.loads(line) for line in Path(val).read_text().splitlines()]
    records = _records(out)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for r in records:
        assert "<|image_pad|>" in r["prompt"] and isinstance(r["response"], str) and r["response"]
    assert json.loads((out / "metrics.json").read_text())["metrics"]["count"] == 6
