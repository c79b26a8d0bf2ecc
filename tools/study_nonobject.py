#!/usr/bin/env python
"""The ViSurf paper's central experiment in miniature: a task outside the base model's knowledge.

    python tools/study_nonobject.py                      # the full study (3 seeds), writes docs/results/
    python tools/study_nonobject.py --quick --out /tmp/q # 1 seed, few steps: a smoke run (minutes)

What it does (everything on CPU, one gloo world of ``--nproc`` ranks, data parallel):

1. **Data** (``tools/make_synthetic_grounding.generate``): a *base* split whose queries always name a
   present object (``no_object_fraction=0``) and a *study* split where a quarter of the queries name
   an absent object (solution ``[]``, "no object"). Queries are single-object ("the red circle");
   no-object queries are phrased the same way ("all red circles" -> "the red circle") so the wording
   gives nothing away. The plain background is replaced by a faint colour ramp (see
   ``shade_background``): the tiny model has no absolute position embedding anywhere (rotary only),
   and the ramp lets it read where an object is from the pixels, which it otherwise cannot learn in
   a CPU-sized budget.
2. **Base model** ("pre-trained knowledge"): the tiny random Qwen2.5-VL
   (``tools/make_tiny_checkpoint``) trained with SFT on the base split. It grounds objects and has
   never answered ``[]``.
3. **Post-training** from that base, on the study split, with the same number of optimizer steps,
   prompts per step and rollouts per prompt: SFT, RLVR, SFT->RLVR (half the steps each), ViSurf, and
   ViSurf without each reward control (``algorithm.align_gt_style=false``,
   ``algorithm.gt_no_thinking_reward=false``, ``algorithm.smooth=false``). Hyper-parameters live in
   ``examples/configs/study/*.yaml``; the script overrides paths, seeds and (``--quick``) step counts.
4. **Evaluation** of every model (and the base) on the held-out study val split, greedy, inside the
   training world (the rollout engine holds the trained weights; no conversion): gIoU, cIoU, N-Acc,
   T-Acc, bbox accuracy, parse failures (box masks: a predicted box filled is its mask).
   **N-Acc counts only well-formed empty answers** (``<answer>[]</answer>`` that parses): the
   library's default (authors' convention) counts an unparseable answer as an empty prediction,
   which credits garbage with N-Acc = 1; gIoU and bbox accuracy use the same strict rule for
   no-target samples. The library's numbers are kept in results.json as ``lib_*``.

Outputs (``--out``): ``nonobject.md`` (tables in the paper's layout, mean ± std over seeds, the
command, wall time), ``nonobject.png`` (bars and training curves), ``results.json`` (everything, per
run). Work files (data, checkpoints, logs, predictions) go to ``--work`` (default
``outputs/study`` or ``outputs/study_quick``); ``--resume`` reuses finished runs found there.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/study_nonobject.py` puts tools/ first, not the repo
    sys.path.insert(0, str(REPO))

CONFIG_DIR = REPO / "examples" / "configs" / "study"


# ----------------------------------------------------------------------------------------------
# The study's fixed design: sizes and step counts (full and --quick)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    seeds: int
    base_train: int  # base split (no no-object queries): training images
    base_val: int
    study_train: int  # study split (no_object_fraction of no-object queries)
    study_val: int
    base_steps: Optional[int]  # None: the base config's train.steps
    steps: Optional[int]  # None: the method configs' train.steps
    image_size: int = 112
    no_object_fraction: float = 0.25
    max_objects: int = 3
    data_seed: int = 0
    model_seed: int = 0
    # tiny Qwen2.5-VL (make_tiny_checkpoint keyword arguments)
    model: tuple = (("hidden", 64), ("layers", 4), ("heads", 4), ("kv_heads", 2), ("intermediate", 128),
                    ("vision_depth", 4), ("vision_hidden", 32), ("vision_heads", 2), ("vision_intermediate", 64))


FULL = Profile("full", seeds=3, base_train=4000, base_val=128, study_train=2000, study_val=160,
               base_steps=None, steps=None)
QUICK = Profile("quick", seeds=1, base_train=400, base_val=32, study_train=200, study_val=48,
                base_steps=120, steps=8)

# (key, table label, config file, what differs from ViSurf)
METHODS: list[tuple[str, str, str]] = [
    ("sft", "SFT", "sft.yaml"),
    ("rlvr", "RLVR", "rlvr.yaml"),
    ("sft_then_rlvr", "SFT→RLVR", "sft_then_rlvr.yaml"),
    ("visurf", "ViSurf", "visurf.yaml"),
    ("visurf_no_align_gt", "ViSurf w/o GT-style alignment", "visurf_no_align_gt.yaml"),
    ("visurf_no_gt_nothink", "ViSurf w/o no-thinking reward for GT", "visurf_no_gt_nothink.yaml"),
    ("visurf_no_smooth", "ViSurf w/o smoothing", "visurf_no_smooth.yaml"),
]
PARADIGM_ROWS = ["base", "sft", "rlvr", "sft_then_rlvr", "visurf"]
ABLATION_ROWS = ["visurf", "visurf_no_align_gt", "visurf_no_gt_nothink", "visurf_no_smooth"]
LABELS = {"base": "Base (SFT on the base split)", **{k: label for k, label, _ in METHODS}}
METRICS = ("giou", "ciou", "n_acc", "t_acc", "bbox_acc", "parse_fail_rate")
CURVE_KEYS = ("reward/total", "reward/accuracy", "reward_gt/total", "entropy", "gt_logp", "visurf/mean_adv_gt",
              "visurf/frac_groups_smoothed", "study/rollout_empty_frac", "study/rollout_correct_empty_frac",
              "response_length", "loss")


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Data


def shade_background(root: str | Path, background=(242, 242, 238), strength: int = 70) -> int:
    """Replace the generator's plain background with a faint ramp: red falls with x, green with y
    (255 -> 255 - strength), blue fixed. Objects are untouched (the generator draws hard-edged
    shapes, so a pixel is either exactly the background colour or an object's). Returns the number
    of images rewritten."""
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
        img[mask] = ramp[mask]
        Image.fromarray(img, "RGB").save(path, format="PNG")
        count += 1
    return count


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


def make_data(work: Path, profile: Profile) -> dict:
    from tools.make_synthetic_grounding import generate

    info = {}
    for split, train, val, frac in (("base", profile.base_train, profile.base_val, 0.0),
                                    ("study", profile.study_train, profile.study_val, profile.no_object_fraction)):
        out = work / "data" / split
        done = out / "done.json"
        if done.exists():
            info[split] = json.loads(done.read_text())
            continue
        seed = profile.data_seed + (0 if split == "base" else 1)  # different images in the two splits
        res = generate(out, train=train, val=val, size=profile.image_size, seed=seed, no_object_fraction=frac,
                       query_types=("single",), max_objects=profile.max_objects, progress=False)
        reworded = sum(unify_no_object_wording(res[k]) for k in ("train", "val"))
        shaded = shade_background(out)
        info[split] = {"train": str(res["train"]), "val": str(res["val"]), "counts": res["counts"],
                       "no_object_fraction": frac, "seed": seed, "reworded_no_object_queries": reworded,
                       "shaded_images": shaded}
        done.write_text(json.dumps(info[split], indent=2))
    return info


def make_model(work: Path, profile: Profile) -> Path:
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    hf = work / "hf"
    if not (hf / "config.json").exists():
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            make_tiny_checkpoint(hf, seed=profile.model_seed, **dict(profile.model))
    return hf


# ----------------------------------------------------------------------------------------------
# Evaluation inside the training world (no conversion: the rollout engine already holds the weights)


def is_well_formed_empty(record: dict) -> bool:
    return record.get("parse_error") is None and not record.get("objects") and not record.get("n_invalid_objects")


def strict_grounding_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """The study's metrics from evaluation records (``eval/scoring.score_sample`` fields).

    A no-target sample is correct (IoU 1 in gIoU, a hit in N-Acc and bbox accuracy) only for a
    well-formed empty answer. Target samples as in the library: IoU of the box masks, bbox hit when
    a predicted box has IoU > 0.5 with the GT box, an unparseable answer predicts nothing. The
    library's own numbers (unparseable = empty) are added as ``lib_*``.
    """
    from visurf_megatron.eval.scoring import metrics_from_records

    n = n_target = n_none = n_none_ok = bbox_ok = target_pred = n_parse_fail = 0
    sum_iou = 0.0
    inter = union = 0
    for r in records:
        st = r["stats"]
        n += 1
        inter += st["inter"]
        union += st["union"]
        n_parse_fail += int(r.get("parse_error") is not None)
        if st["no_target"]:
            n_none += 1
            ok = is_well_formed_empty(r)
            n_none_ok += int(ok)
            sum_iou += float(ok)
            bbox_ok += int(ok)
        else:
            n_target += 1
            sum_iou += st["iou"]
            bbox_ok += int(st["bbox_hit"])
            target_pred += int(not st["pred_empty"])

    def ratio(a, b):
        return a / b if b else None

    target_iou = sum(r["stats"]["iou"] for r in records if not r["stats"]["no_target"])
    out = {"giou": ratio(sum_iou, n), "ciou": ratio(inter, union), "n_acc": ratio(n_none_ok, n_none),
           "t_acc": ratio(target_pred, n_target), "bbox_acc": ratio(bbox_ok, n),
           "target_giou": ratio(target_iou, n_target),
           "target_bbox_acc": ratio(sum(int(r["stats"]["bbox_hit"]) for r in records if not r["stats"]["no_target"]),
                                    n_target),
           "parse_fail_rate": ratio(n_parse_fail, n), "count": n, "no_target_count": n_none}
    lib = metrics_from_records(records, "grounding")
    out.update({f"lib_{k}": v for k, v in lib.items() if k != "count"})
    return out


def evaluate_trainer(trainer, val_path: str, *, image_size: int, max_new_tokens: int,
                     predictions_path: Optional[str] = None, limit: Optional[int] = None) -> Optional[dict]:
    """Greedy evaluation of the trainer's current weights on ``val_path``; collective (every rank
    calls it). The weights go into the rollout engine (``sync_weights``); each data-parallel replica
    answers its share of the samples; rank 0 gathers the records and returns the metrics (other
    ranks return None). Prompts, parsing, coordinate mapping and masks are the evaluation library's
    (``eval/runner.build_request``, ``eval/scoring.score_sample``, the box segmenter)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from visurf_megatron.eval.datasets import load_eval_items
    from visurf_megatron.eval.runner import build_request
    from visurf_megatron.eval.scoring import score_sample
    from visurf_megatron.eval.segmenter import build_segmenter
    from visurf_megatron.rollout.base import SamplingConfig

    cfg = trainer.cfg
    items = load_eval_items(val_path, task="grounding")
    if limit:
        items = items[:limit]
    trainer.sync_weights()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    records = []
    if trainer.engine is not None:
        segmenter = build_segmenter("box")
        sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        mine = items[dp_rank::dp_size]
        built = [build_request(it.sample, trainer.processor, image_size=image_size,
                               prompt_style=cfg.data.prompt_style, think=cfg.data.think) for it in mine]
        completions = trainer.engine.generate([r for r, _ in built], sampling) if built else []
        for it, (_, stored), group in zip(mine, built, completions):
            c = group[0]
            rec, _ = score_sample(it, c.text, image=stored, image_size=image_size, segmenter=segmenter)
            records.append({"id": it.id, "index": it.index, "query": it.sample.problem, "response": c.text,
                            "finish_reason": c.finish_reason, **rec})
        trainer.engine.sleep()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() != 0:
        return None
    by_id: dict[str, dict] = {}
    for part in gathered:
        for r in part:
            by_id.setdefault(r["id"], r)
    records = sorted(by_id.values(), key=lambda r: r["index"])
    if predictions_path:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return strict_grounding_metrics(records)


# ----------------------------------------------------------------------------------------------
# Training inside the world


def _study_trainer_class():
    """``Trainer`` plus two rollout metrics the study plots: the share of rollouts answering ``[]``
    and the share answering ``[]`` correctly (accuracy 3 with no object: only a no-object prompt
    scores that). Nothing else changes."""
    from visurf_megatron.rewards.parsing import parse_response
    from visurf_megatron.training import experience
    from visurf_megatron.training.trainer import Trainer

    class StudyTrainer(Trainer):
        def _reward_metrics(self, rows, sums) -> None:
            super()._reward_metrics(rows, sums)
            if not experience.is_generating_rank():
                return
            for row in rows:
                if row.is_gt:
                    continue
                parsed = parse_response(row.text)
                empty = parsed.error is None and parsed.objects == []
                sums.add("study/rollout_empty_frac", float(empty))
                sums.add("study/rollout_correct_empty_frac", float(empty and row.reward.get("accuracy", 0) >= 3))

    return StudyTrainer


def _read_curves(metrics_jsonl: Path) -> dict[str, list]:
    curves: dict[str, list] = {"step": []}
    if not metrics_jsonl.exists():
        return curves
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    curves["step"] = [r["step"] for r in rows]
    for key in CURVE_KEYS:
        if any(r.get(key) is not None for r in rows):
            curves[key] = [r.get(key) for r in rows]
    return curves


def study_world(jobs: list[dict], log_dir: str) -> list[dict]:
    """Rank function: run every job (train, then evaluate) in this one world; rank 0 returns the
    results. Trainer output goes to ``log_dir/rank<r>.log``; progress lines to stderr."""
    import gc

    import torch.distributed as dist

    from visurf_megatron.config import load_config

    rank = dist.get_rank()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    results = []
    StudyTrainer = _study_trainer_class()
    with open(Path(log_dir) / f"rank{rank}.log", "a", buffering=1) as out, contextlib.redirect_stdout(out):
        for job in jobs:
            result_file = Path(job["result_file"])
            if job.get("resume") and result_file.exists():
                if rank == 0:
                    results.append(json.loads(result_file.read_text()))
                    log(f"{job['name']}: reused {result_file}")
                continue
            print(f"==== {job['name']} {job['overrides']}", flush=True)
            cfg = load_config(job["config"], job["overrides"], world_size=dist.get_world_size())
            t0 = time.perf_counter()
            trainer = StudyTrainer(cfg)
            trainer.train()
            dist.barrier()
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            evals = {}
            for name, val in job["evals"].items():
                evals[name] = evaluate_trainer(trainer, val, image_size=cfg.data.image_size,
                                               max_new_tokens=job["eval_max_new_tokens"],
                                               predictions_path=str(Path(job["run_dir"]) / f"predictions_{name}.jsonl"))
            eval_s = time.perf_counter() - t1
            del trainer
            gc.collect()
            if rank == 0:
                result = {"name": job["name"], "method": job["method"], "seed": job["seed"],
                          "config": job["config"], "overrides": job["overrides"], "steps": cfg.train.steps,
                          "metrics": evals.get("study_val"), "evals": evals,
                          "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
                          "curves": _read_curves(Path(cfg.logging.dir) / "metrics.jsonl")}
                result_file.parent.mkdir(parents=True, exist_ok=True)
                result_file.write_text(json.dumps(result))
                results.append(result)
                m = result["metrics"]
                log(f"{job['name']}: trained {cfg.train.steps} steps in {train_s:.0f} s, evaluated in {eval_s:.0f} s: "
                    f"gIoU {_pct(m['giou'])} cIoU {_pct(m['ciou'])} N-Acc {_pct(m['n_acc'])} "
                    f"T-Acc {_pct(m['t_acc'])} bbox {_pct(m['bbox_acc'])} parse-fail {_pct(m['parse_fail_rate'])}")
            dist.barrier()
    return results if rank == 0 else []


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


# ----------------------------------------------------------------------------------------------
# Plan


def load_method_configs(config_dir: Path) -> dict[str, dict]:
    """Every method's YAML as a dict, and a check that the comparison is fair: same steps, prompts
    per step, rollouts per prompt, learning rate and generation length for all methods."""
    import yaml

    from visurf_megatron.config import load_config

    out = {}
    for key, _, file in METHODS:
        path = config_dir / file
        load_config(path, world_size=2)  # validates
        out[key] = {"path": str(path), "data": yaml.safe_load(path.read_text())}
    fair = {}
    for key, entry in out.items():
        cfg = load_config(entry["path"], world_size=2)
        fair[key] = (cfg.train.steps, cfg.data.prompts_per_step, cfg.rollout.n, cfg.train.lr, cfg.rollout.max_new_tokens,
                     cfg.rollout.temperature, cfg.data.image_size, cfg.data.prompt_style, cfg.data.think)
    if len(set(fair.values())) != 1:
        raise SystemExit(f"study configs differ in steps/prompts/rollouts/lr/generation: {fair}")
    return out


def build_jobs(work: Path, hf: Path, data: dict, profile: Profile, config_dir: Path, *, seeds: int,
               resume: bool, eval_max_new_tokens: int) -> list[dict]:
    base_cfg = config_dir / "base_sft.yaml"
    base_ckpt = work / "base" / "checkpoints"
    common = [f"model.hf_path={hf}"]
    jobs = []
    base_over = common + [f"data.train_path={data['base']['train']}", f"checkpoint.dir={base_ckpt}",
                          f"logging.dir={work / 'base' / 'logs'}", "checkpoint.resume=false"]
    if profile.base_steps is not None:
        base_over.append(f"train.steps={profile.base_steps}")
    jobs.append({"name": "base", "method": "base", "seed": 0, "config": str(base_cfg), "overrides": base_over,
                 "run_dir": str(work / "base"), "result_file": str(work / "base" / "result.json"),
                 "evals": {"study_val": data["study"]["val"], "base_val": data["base"]["val"]},
                 "eval_max_new_tokens": eval_max_new_tokens, "resume": resume})
    load_method_configs(config_dir)
    for seed in range(seeds):
        for key, _, file in METHODS:
            run_dir = work / "runs" / f"{key}_seed{seed}"
            over = common + [f"model.megatron_path={base_ckpt}", f"data.train_path={data['study']['train']}",
                             f"train.seed={1000 + seed}", f"rollout.seed={2000 + seed}",
                             f"logging.dir={run_dir / 'logs'}"]
            if profile.steps is not None:
                over.append(f"train.steps={profile.steps}")
                if key == "sft_then_rlvr":
                    over.append(f"algorithm.sft_then_rlvr_switch_step={profile.steps // 2}")
            jobs.append({"name": f"{key}_seed{seed}", "method": key, "seed": seed, "config": str(config_dir / file),
                         "overrides": over, "run_dir": str(run_dir), "result_file": str(run_dir / "result.json"),
                         "evals": {"study_val": data["study"]["val"]}, "eval_max_new_tokens": eval_max_new_tokens,
                         "resume": resume})
    return jobs


# ----------------------------------------------------------------------------------------------
# Aggregation and report


def mean_std(values: Sequence[Optional[float]]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": vals}


def summarise(results: list[dict]) -> dict:
    summary = {}
    for method in ["base"] + [k for k, _, _ in METHODS]:
        runs = [r for r in results if r["method"] == method]
        if runs:
            summary[method] = {m: mean_std([r["metrics"].get(m) for r in runs]) for m in METRICS + ("lib_n_acc", "lib_giou")}
            summary[method]["train_s"] = mean_std([r["train_s"] for r in runs])
    return summary


def _cell(stat: dict, seeds: int) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    text = f"{100 * stat['mean']:.1f}"
    if seeds > 1 and stat["n"] > 1:
        text += f" ± {100 * stat['std']:.1f}"
    return text


def render_markdown(payload: dict) -> str:
    s, seeds = payload["summary"], payload["settings"]["seeds"]
    st = payload["settings"]
    lines = ["# No-object study: a task outside the base model's knowledge (miniature ViSurf Tables 1, 4, 8)", ""]
    if payload["settings"]["profile"] == "quick":
        lines += ["> **--quick smoke run** (1 seed, few steps): not the study; numbers mean nothing.", ""]
    lines += [
        f"Produced by one run of `{payload['command']}` on {payload['machine']['cpus']} CPU cores "
        f"({payload['machine']['platform']}), wall time **{payload['wall_s'] / 60:.1f} min** "
        f"(data {payload['timing']['data_s']:.0f} s, base model {payload['timing']['base_s']:.0f} s, "
        f"{len(payload['runs'])} post-training runs {payload['timing']['runs_s']:.0f} s; started {payload['started']}).",
        "",
        f"Base model: tiny Qwen2.5-VL ({st['model_params']}) trained with SFT for {st['base_steps']} steps on "
        f"{st['base_train']} base-split images (every query names a present object; it never saw `[]`). "
        f"Every method then trains {st['steps']} optimizer steps from it on the study split "
        f"({st['study_train']} images, {100 * st['no_object_fraction']:.0f}% no-object queries), "
        f"{st['prompts_per_step']} prompts/step, {st['rollouts']} rollouts per prompt (ViSurf: + the GT row), lr {st['lr']}; "
        f"SFT→RLVR switches at step {st['switch_step']}. Evaluation: greedy on the held-out study val split "
        f"({st['study_val']} images, {st['no_target_val']} without a target); mean ± std over {seeds} seed(s) "
        "(data order and rollout sampling; one base model).",
        "",
        "**Metrics** (%): gIoU = mean per-sample IoU of the box masks (a no-target sample scores 1 only for a "
        "well-formed `[]`), cIoU = ΣI/ΣU, **N-Acc = no-target samples answered with a well-formed `[]`** "
        "(stricter than the library default, which counts unparseable answers as empty; those numbers are "
        "`lib_*` in results.json), T-Acc = target samples with a non-empty prediction, bbox acc = IoU > 0.5 "
        "with the GT box (no-target: a well-formed `[]`), parse fail = answers that do not parse.",
        "",
        "## Paradigms (paper Table 1, gRefCOCO columns)",
        "",
        "| Method | gIoU | cIoU | N-Acc | T-Acc | bbox acc | parse fail |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in PARADIGM_ROWS:
        if key in s:
            n = 1 if key == "base" else seeds
            lines.append(f"| {LABELS[key]} | " + " | ".join(_cell(s[key][m], n) for m in METRICS) + " |")
    lines += ["", "## Reward controls (paper Table 4 ablation; ✓ = on)", "",
              "| Align GT style | No thinking reward for GT | Smoothing | gIoU | cIoU | N-Acc | T-Acc | bbox acc | parse fail |",
              "| :---: | :---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    flags = {"visurf": "✓✓✓", "visurf_no_align_gt": "✗✓✓", "visurf_no_gt_nothink": "✓✗✓", "visurf_no_smooth": "✓✓✗"}
    for key in ABLATION_ROWS:
        if key in s:
            f = flags[key]
            lines.append(f"| {f[0]} | {f[1]} | {f[2]} | " + " | ".join(_cell(s[key][m], seeds) for m in METRICS) + " |")
    lines += ["", "## Per seed: N-Acc (%)", "", "| Method | " + " | ".join(f"seed {i}" for i in range(seeds)) + " |",
              "| --- | " + " | ".join("---:" for _ in range(seeds)) + " |"]
    for key, _, _ in METHODS:
        vals = {r["seed"]: r["metrics"]["n_acc"] for r in payload["runs"] if r["method"] == key}
        lines.append(f"| {LABELS[key]} | " + " | ".join(_pct(vals.get(i)) for i in range(seeds)) + " |")
    base_val = payload.get("base_on_base_val")
    if base_val:
        lines += ["", f"Base model on the base val split (targets only): gIoU {_pct(base_val['giou'])}, "
                      f"bbox acc {_pct(base_val['bbox_acc'])}, parse fail {_pct(base_val['parse_fail_rate'])}."]
    lines += ["", "![bars and training curves](nonobject.png)", "",
              "Raw numbers (per run, with training curves): `results.json`. Rerun: the command above "
              "(`--quick` for a smoke run; `--work` keeps data, logs and predictions).", ""]
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    return "\n".join(lines)


def _smooth(ys: list, k: int) -> list:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-k:]
        vals = [v for v in acc if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = payload["summary"]
    methods = [k for k in ["base"] + [m for m, _, _ in METHODS] if k in s]
    short = {"base": "Base", "sft": "SFT", "rlvr": "RLVR", "sft_then_rlvr": "SFT→RLVR", "visurf": "ViSurf",
             "visurf_no_align_gt": "−align", "visurf_no_gt_nothink": "−no-think", "visurf_no_smooth": "−smooth"}
    colors = {"base": "0.6", "sft": "tab:blue", "rlvr": "tab:orange", "sft_then_rlvr": "tab:green",
              "visurf": "tab:red", "visurf_no_align_gt": "tab:purple", "visurf_no_gt_nothink": "tab:brown",
              "visurf_no_smooth": "tab:pink"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0][0]
    shown = ("giou", "ciou", "n_acc", "t_acc", "bbox_acc")
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        means = [100 * (s[m][k]["mean"] or 0) for k in shown]
        errs = [100 * (s[m][k]["std"] or 0) for k in shown]
        ax.bar([j + i * width for j in range(len(shown))], means, width, yerr=errs, capsize=2, label=short[m],
               color=colors[m])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))])
    ax.set_xticklabels(["gIoU", "cIoU", "N-Acc", "T-Acc", "bbox acc"])
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title("Study val split")
    ax.legend(fontsize=7, ncol=2)
    panels = [("reward/total", "rollout reward (total, max 7)"), ("entropy", "policy entropy (rollout tokens)"),
              ("gt_active", "A_gt share: groups whose GT row has A≠0"), ("visurf/mean_adv_gt", "mean A_gt"),
              ("study/rollout_empty_frac", "rollouts answering []")]
    for ax, (key, title) in zip([axes[0][1], axes[0][2], axes[1][0], axes[1][1], axes[1][2]], panels):
        for m in methods:
            if m == "base":
                continue
            runs = [r for r in payload["runs"] if r["method"] == m]
            series = []
            for r in runs:
                c = r["curves"]
                if key == "gt_active":
                    if "visurf/frac_groups_smoothed" not in c:
                        continue
                    ys = [None if v is None else 1 - v for v in c["visurf/frac_groups_smoothed"]]
                else:
                    if key not in c:
                        continue
                    ys = c[key]
                series.append((c["step"], ys))
            if not series:
                continue
            steps = series[0][0]
            mean = []
            for i in range(len(steps)):
                vals = [ys[i] for _, ys in series if i < len(ys) and ys[i] is not None]
                mean.append(sum(vals) / len(vals) if vals else None)
            k = max(1, len(steps) // 15)
            sm = _smooth(mean, k)
            ax.plot([x for x, y in zip(steps, sm) if y is not None], [y for y in sm if y is not None],
                    label=short[m], color=colors[m])
        ax.set_title(title + " (mean over seeds, smoothed)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"No-object study ({payload['settings']['profile']}): {payload['settings']['seeds']} seed(s), "
                 f"{payload['settings']['steps']} steps per method")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main


def _count_params(hf: Path) -> str:
    from safetensors import safe_open

    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return f"{total / 1e6:.2f}M parameters"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "results"), help="where nonobject.md/.png and results.json go")
    p.add_argument("--work", default=None, help="work directory (default outputs/study or outputs/study_quick)")
    p.add_argument("--quick", action="store_true", help="1 seed, few steps, small data: a smoke run, not the study")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick 1)")
    p.add_argument("--configs", default=str(CONFIG_DIR), help="directory of the study's YAML configs")
    p.add_argument("--nproc", type=int, default=2, help="ranks (data parallel) of the training world")
    p.add_argument("--resume", action="store_true", help="reuse finished runs (result.json) found in --work")
    p.add_argument("--timeout-min", type=float, default=240, help="kill the training world after this long")
    args = p.parse_args(argv)

    started = time.time()
    profile = QUICK if args.quick else FULL
    seeds = args.seeds or profile.seeds
    work = Path(args.work or REPO / "outputs" / ("study_quick" if args.quick else "study")).resolve()
    out = Path(args.out).resolve()
    config_dir = Path(args.configs).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work.mkdir(parents=True, exist_ok=True)
    command = "python tools/study_nonobject.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from visurf_megatron.config import load_config
    from visurf_megatron.runtime.spawn import run_world

    method_cfgs = load_method_configs(config_dir)
    log(f"profile {profile.name}: {seeds} seed(s), work dir {work}")
    t = time.time()
    data = make_data(work, profile)
    hf = make_model(work, profile)
    data_s = time.time() - t
    log(f"data and tiny model ready in {data_s:.0f} s: {data['base']['counts']} / {data['study']['counts']}")
    jobs = build_jobs(work, hf, data, profile, config_dir, seeds=seeds, resume=args.resume,
                      eval_max_new_tokens=load_config(method_cfgs["visurf"]["path"]).rollout.max_new_tokens)
    t = time.time()
    results = run_world(study_world, args.nproc, jobs, str(work / "logs"), timeout_s=args.timeout_min * 60,
                        env={"PYTHONUNBUFFERED": "1"})[0]
    world_s = time.time() - t
    base = next(r for r in results if r["method"] == "base")
    runs = [r for r in results if r["method"] != "base"]

    ref = load_config(method_cfgs["visurf"]["path"], jobs[1]["overrides"])
    base_cfg = load_config(jobs[0]["config"], jobs[0]["overrides"])
    study_rows = [json.loads(line) for line in Path(data["study"]["val"]).read_text().splitlines() if line.strip()]
    settings = {
        "profile": profile.name, "seeds": seeds, "nproc": args.nproc, "image_size": profile.image_size,
        "model": dict(profile.model), "model_params": _count_params(hf),
        "base_train": profile.base_train, "base_val": profile.base_val, "base_steps": base_cfg.train.steps,
        "base_lr": base_cfg.train.lr, "base_prompts_per_step": base_cfg.data.prompts_per_step,
        "study_train": profile.study_train, "study_val": profile.study_val,
        "no_target_val": sum(1 for r in study_rows if r["solution"] == []),
        "no_object_fraction": profile.no_object_fraction, "max_objects": profile.max_objects,
        "steps": ref.train.steps, "prompts_per_step": ref.data.prompts_per_step, "rollouts": ref.rollout.n,
        "lr": ref.train.lr, "max_new_tokens": ref.rollout.max_new_tokens, "prompt_style": ref.data.prompt_style,
        "switch_step": load_config(method_cfgs["sft_then_rlvr"]["path"],
                                   next(j for j in jobs if j["method"] == "sft_then_rlvr")["overrides"]
                                   ).algorithm.sft_then_rlvr_switch_step,
        "configs": {k: v["path"] for k, v in method_cfgs.items()} | {"base": jobs[0]["config"]},
        "data": data,
    }
    wall_s = time.time() - started
    payload = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": round(wall_s, 1),
        "timing": {"data_s": round(data_s, 1), "world_s": round(world_s, 1), "base_s": base["train_s"] + base["eval_s"],
                   "runs_s": round(sum(r["train_s"] + r["eval_s"] for r in runs), 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": settings,
        "summary": summarise(results),
        "base": base, "base_on_base_val": base["evals"].get("base_val"),
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "nonobject.md").write_text(render_markdown(payload))
    plot(payload, out / "nonobject.png")
    log(f"done in {wall_s / 60:.1f} min: {out / 'nonobject.md'}, {out / 'nonobject.png'}, {out / 'results.json'}")
    print((out / "nonobject.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
