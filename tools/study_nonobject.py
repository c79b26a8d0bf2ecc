#!/usr/bin/env python
"""The ViSurf paper's central experiment in miniature: a task outside the base model's knowledge.

    python tools/study_nonobject.py                      # the full study (3 seeds), writes docs/results/
    python tools/study_nonobject.py --quick --out /tmp/q # 1 seed, few steps: a smoke run (minutes)

What it does (everything on CPU, one gloo world of ``--nproc`` ranks, data parallel):

1. **Data** (``tools/make_synthetic_grounding.generate``, 48 px images, objects 20-35 % of the side):
   a *warm-up* split of one-object scenes, a *base* split whose queries always name a present object
   (2-3 objects, ``no_object_fraction=0``) and a *study* split where a quarter of the queries name an
   absent object (solution ``[]``, "no object"; the named colour is nowhere in the image, see
   ``design.Profile.absent``). Queries are single-object ("the red circle");
   no-object queries are phrased the same way ("all red circles" -> "the red circle") so the wording
   gives nothing away. The tiny model has no absolute position embedding anywhere (rotary only), so
   no pixel would tell it where an object is: ``shade_background`` paints a colour ramp (red with x,
   green with y) into a 4-pixel halo around each object, which puts the position into the object's
   own image tokens. (A ramp over the whole background was not learnt in 1800 steps: gIoU 0.4 %; the
   halo reached 30 % in 600 steps on one-object scenes.)
2. **Base model** ("pre-trained knowledge"): the tiny random Qwen2.5-VL
   (``tools/make_tiny_checkpoint``) trained with SFT in three stages: the warm-up split; the base
   split mixed with *existence* questions ("Is there "the red circle" in the image?", yes/no, half
   absent, scenes drawn like the study split's); then the existence questions again, now the bulk
   of the rows (three copies to one of the base split), at a lower learning rate. It grounds objects
   and has never answered a grounding query with ``[]``; the existence questions are what should
   make it tell that a named object is absent (the paper's premise, checked in step 5). The last
   stage is there because binding a colour word to the image is the slow part for the tiny model: a
   third of the rows at the grounding stages' learning rate, their loss never left ln 2.
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

5. **Premise** (``probe.py``): a linear probe shows whether the base model's hidden states tell a
   present from an absent target (random initial model as the control), next to its behaviour
   (greedy N-Acc, ``[]`` share of its sampled rollouts).
6. **Forgetting**: every model is also evaluated on the base val split (the base task, targets
   only), before (the base model) and after post-training.

Outputs (``--out``): ``nonobject.md`` (tables in the paper's layout, mean ± std over seeds, the
command, wall time, whether the curves settled; ``nonobject_reading.md`` beside it, if present, is
rendered in as the reading), ``nonobject.png`` (bars and training curves), ``results.json``
(everything, per run). Work files (data, checkpoints, logs, predictions) go to ``--work`` (default
``outputs/study`` or ``outputs/study_quick``); ``--resume`` reuses finished runs found there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/study_nonobject.py` puts tools/ first, not the repo
    sys.path.insert(0, str(REPO))

from tools.nonobject_study.data import make_data, make_model  # noqa: E402
from tools.nonobject_study.design import CURVE_KEYS, FULL, METHODS, QUICK, Profile  # noqa: E402
from tools.nonobject_study.probe import check_premise  # noqa: E402
from tools.nonobject_study.report import forgetting, pct, plot, render_markdown, settling, summarise  # noqa: E402
from tools.nonobject_study.scoring import evaluate_trainer  # noqa: E402

CONFIG_DIR = REPO / "examples" / "configs" / "study"
BASE_STAGES = 3  # build_jobs' first jobs: the base model's SFT stages


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
                    results.append(json.loads(result_file.read_text()) | {"reused": True})
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
            trainer.close()
            del trainer
            gc.collect()
            if rank == 0:
                result = {"name": job["name"], "method": job["method"], "seed": job["seed"],
                          "config": job["config"], "overrides": job["overrides"], "steps": cfg.train.steps,
                          "metrics": evals.get("study_val") or next(iter(evals.values())), "evals": evals,
                          "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
                          "curves": _read_curves(Path(cfg.logging.dir) / "metrics.jsonl")}
                result_file.parent.mkdir(parents=True, exist_ok=True)
                result_file.write_text(json.dumps(result))
                results.append(result)
                m = result["metrics"]
                scores = ([f"gIoU {pct(m['giou'])} cIoU {pct(m['ciou'])} N-Acc {pct(m['n_acc'])} T-Acc {pct(m['t_acc'])} "
                           f"bbox {pct(m['bbox_acc'])} parse-fail {pct(m['parse_fail_rate'])}"] if "giou" in m else [])
                if evals.get("existence_val"):
                    scores.append(f"existence acc {pct(evals['existence_val']['balanced_accuracy'])} (balanced)")
                log(f"{job['name']}: trained {cfg.train.steps} steps in {train_s:.0f} s, evaluated in {eval_s:.0f} s: "
                    + "; ".join(scores))
            dist.barrier()
    return results if rank == 0 else []


# ----------------------------------------------------------------------------------------------
# Plan


def load_method_configs(config_dir: Path) -> dict[str, str]:
    """Every method's config path, each validated, and a check that the comparison is fair: same
    steps, prompts per step, rollouts per prompt, learning rate and generation for all methods."""
    from visurf_megatron.config import load_config

    out, fair = {}, {}
    for key, _, file in METHODS:
        out[key] = str(config_dir / file)
        cfg = load_config(out[key], world_size=2)
        fair[key] = (cfg.train.steps, cfg.data.prompts_per_step, cfg.rollout.n, cfg.train.lr, cfg.rollout.max_new_tokens,
                     cfg.rollout.temperature, cfg.data.image_size, cfg.data.prompt_style, cfg.data.think)
    if len(set(fair.values())) != 1:
        raise SystemExit(f"study configs differ in steps/prompts/rollouts/lr/generation: {fair}")
    return out


def build_jobs(work: Path, hf: Path, data: dict, profile: Profile, config_dir: Path, *, seeds: int,
               resume: bool, eval_max_new_tokens: int) -> list[dict]:
    """The world's work list: the base model in three SFT stages (one-object scenes; the base split
    mixed with existence questions; existence questions, ``profile.existence_copies`` copies each,
    mixed with the base split), then every method x seed from the base checkpoint."""
    warm_ckpt = work / "base_warmup" / "checkpoints"
    grounding_ckpt = work / "base_grounding" / "checkpoints"
    base_ckpt = work / "base" / "checkpoints"
    common = [f"model.hf_path={hf}"]
    jobs = []
    for name, cfg_file, split, init, ckpt, steps, evals in (
            ("base_warmup", "base_warmup.yaml", "warmup", None, warm_ckpt, profile.warmup_steps,
             {"warmup_val": data["warmup"]["val"]}),
            ("base_grounding", "base_sft.yaml", "base_mix", warm_ckpt, grounding_ckpt, profile.base_steps,
             {"study_val": data["study"]["val"], "base_val": data["base"]["val"],
              "existence_val": data["existence"]["val"]}),
            ("base", "base_existence.yaml", "existence_mix", grounding_ckpt, base_ckpt, profile.existence_steps,
             {"study_val": data["study"]["val"], "base_val": data["base"]["val"],
              "existence_val": data["existence"]["val"]})):
        over = common + [f"data.train_path={data[split]['train']}", f"checkpoint.dir={ckpt}",
                         f"logging.dir={work / name / 'logs'}", "checkpoint.resume=false"]
        if init is not None:
            over.append(f"model.megatron_path={init}")
        if steps is not None:
            over.append(f"train.steps={steps}")
        jobs.append({"name": name, "method": name, "seed": 0, "config": str(config_dir / cfg_file), "overrides": over,
                     "run_dir": str(work / name), "result_file": str(work / name / "result.json"), "evals": evals,
                     "eval_max_new_tokens": eval_max_new_tokens, "resume": resume})
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
                         "evals": {"study_val": data["study"]["val"], "base_val": data["base"]["val"],
                                   "existence_val": data["existence"]["val"]},
                         "eval_max_new_tokens": eval_max_new_tokens,
                         "resume": resume})
    return jobs


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
    p.add_argument("--base-only", action="store_true", help="build and evaluate the base model only (calibration)")
    p.add_argument("--timeout-min", type=float, default=240, help="kill the training world after this long")
    p.add_argument("--report-only", action="store_true",
                   help="re-render nonobject.md/.png from --out's results.json (and nonobject_reading.md); train nothing")
    args = p.parse_args(argv)
    if args.report_only:
        results_json = Path(args.out) / "results.json"
        if not results_json.is_file():
            raise SystemExit(f"--report-only: no {results_json}; run the study first")
        return write_report(Path(args.out).resolve(), json.loads(results_json.read_text()))

    started = time.time()
    profile = QUICK if args.quick else FULL
    seeds = args.seeds or profile.seeds
    work = Path(args.work or REPO / "outputs" / ("study_quick" if args.quick else "study")).resolve()
    out = Path(args.out).resolve()
    config_dir = Path(args.configs).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python tools/study_nonobject.py"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])

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
                      eval_max_new_tokens=load_config(method_cfgs["visurf"]).rollout.max_new_tokens)
    if args.base_only:
        jobs = jobs[:BASE_STAGES]
    t = time.time()
    results = run_world(study_world, args.nproc, jobs, str(work / "logs"), timeout_s=args.timeout_min * 60,
                        env={"PYTHONUNBUFFERED": "1"})[0]
    world_s = time.time() - t
    if args.base_only:
        log(f"base model built and evaluated in {world_s:.0f} s: {work / 'base'}")
        return 0
    stages = results[:BASE_STAGES]
    warm, grounding, base = stages
    runs = results[BASE_STAGES:]

    ref = load_config(method_cfgs["visurf"], next(j for j in jobs if j["method"] == "visurf")["overrides"])
    t = time.time()
    premise = check_premise(work, hf, work / "base" / "checkpoints", data, image_size=ref.data.image_size,
                            prompt_style=ref.data.prompt_style, think=ref.data.think,
                            per_class_train=profile.probe_train, per_class_val=profile.probe_val)
    probe_s = time.time() - t
    log("premise probe (balanced held-out accuracy of 'the named object is present'): "
        + ", ".join(f"{k} {pct(v['val_balanced_acc'])}" for k, v in premise["models"].items()) + f" ({probe_s:.0f} s)")
    warm_cfg = load_config(jobs[0]["config"], jobs[0]["overrides"])
    base_cfg = load_config(jobs[1]["config"], jobs[1]["overrides"])
    exist_cfg = load_config(jobs[2]["config"], jobs[2]["overrides"])
    study_rows = [json.loads(line) for line in Path(data["study"]["val"]).read_text().splitlines() if line.strip()]
    settings = {
        "profile": profile.name, "seeds": seeds, "nproc": args.nproc, "data_size": profile.data_size,
        "image_size": ref.data.image_size, "init_std": profile.init_std,
        "object_frac": list(profile.object_frac), "halo": profile.halo, "shade_strength": profile.shade_strength,
        "existence_steps": exist_cfg.train.steps, "existence_lr": exist_cfg.train.lr,
        "existence_prompts_per_step": exist_cfg.data.prompts_per_step, "existence_copies": profile.existence_copies,
        "warmup_train": profile.warmup_train, "warmup_steps": warm_cfg.train.steps,
        "model": dict(profile.model), "model_params": _count_params(hf),
        "base_train": profile.base_train, "base_val": profile.base_val, "base_steps": base_cfg.train.steps,
        "base_lr": base_cfg.train.lr, "base_prompts_per_step": base_cfg.data.prompts_per_step,
        "study_train": profile.study_train, "study_val": profile.study_val,
        "existence_train": profile.existence_train, "existence_val": profile.existence_val,
        "no_target_val": sum(1 for r in study_rows if r["solution"] == []),
        "no_object_fraction": profile.no_object_fraction, "max_objects": profile.max_objects,
        "steps": ref.train.steps, "prompts_per_step": ref.data.prompts_per_step, "rollouts": ref.rollout.n,
        "lr": ref.train.lr, "max_new_tokens": ref.rollout.max_new_tokens, "prompt_style": ref.data.prompt_style,
        "switch_step": load_config(method_cfgs["sft_then_rlvr"],
                                   next(j for j in jobs if j["method"] == "sft_then_rlvr")["overrides"]
                                   ).algorithm.sft_then_rlvr_switch_step,
        "configs": dict(method_cfgs) | {"base_warmup": jobs[0]["config"], "base_grounding": jobs[1]["config"],
                                        "base": jobs[2]["config"]},
        "data": data,
    }
    wall_s = time.time() - started
    payload = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": round(wall_s, 1),
        "timing": {"data_s": round(data_s, 1), "world_s": round(world_s, 1), "probe_s": round(probe_s, 1),
                   "base_s": round(sum(r["train_s"] + r["eval_s"] for r in stages), 1),
                   "runs_s": round(sum(r["train_s"] + r["eval_s"] for r in runs), 1),
                   # --resume: jobs finished by an earlier invocation (their times are in base_s / runs_s)
                   "jobs": len(results), "reused_jobs": [r["name"] for r in results if r.get("reused")],
                   "reused_s": round(sum(r["train_s"] + r["eval_s"] for r in results if r.get("reused")), 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": settings,
        "summary": summarise(results),
        "premise": premise,
        "forgetting": forgetting(base, runs),
        "settling": settling(runs),
        "base_warmup": warm, "base_grounding": grounding, "base": base, "base_on_base_val": base["evals"].get("base_val"),
        "runs": runs,
    }
    log(f"done in {wall_s / 60:.1f} min")
    return write_report(out, payload)


def write_report(out: Path, payload: dict) -> int:
    """results.json, nonobject.md and nonobject.png in ``out``. The hand-written reading of a run
    (what drives each difference), ``nonobject_reading.md`` beside them, is rendered into the
    report; it names the run it was written for."""
    out.mkdir(parents=True, exist_ok=True)
    payload.pop("reading", None)
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    reading = out / "nonobject_reading.md"
    if reading.is_file() and payload["settings"]["profile"] != "quick":
        payload["reading"] = reading.read_text()
    (out / "nonobject.md").write_text(render_markdown(payload))
    plot(payload, out / "nonobject.png")
    log(f"wrote {out / 'nonobject.md'}, {out / 'nonobject.png'}, {out / 'results.json'}")
    print((out / "nonobject.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
