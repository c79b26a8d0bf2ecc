"""Aggregation over seeds and the report: ``nonobject.md`` (tables in the paper's layout) and
``nonobject.png`` (bars and training curves)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from .design import ABLATION_ROWS, LABELS, METHODS, METRICS, PARADIGM_ROWS


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"



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
        f"Base model: tiny Qwen2.5-VL ({st['model_params']}) trained with SFT for {st['warmup_steps']} steps on "
        f"{st['warmup_train']} one-object scenes, then {st['base_steps']} steps on {st['base_train']} base-split "
        f"images (2-3 objects; every query names a present object; it never saw `[]`). Images are "
        f"{st['data_size']} px (fed at {st['image_size']} px), objects {st['object_frac'][0]:.0%}-{st['object_frac'][1]:.0%} "
        f"of the side, position painted in a {st['halo']}-px colour-ramp halo around each object (no absolute "
        "position embedding in the model; see the script's docstring). "
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
        lines.append(f"| {LABELS[key]} | " + " | ".join(pct(vals.get(i)) for i in range(seeds)) + " |")
    base_val = payload.get("base_on_base_val")
    if base_val:
        lines += ["", f"Base model on the base val split (targets only): gIoU {pct(base_val['giou'])}, "
                      f"bbox acc {pct(base_val['bbox_acc'])}, parse fail {pct(base_val['parse_fail_rate'])}."]
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


