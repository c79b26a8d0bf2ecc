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


# The paper's numbers each table answers to (ViSurf paper; gRefCOCO val, Qwen2.5-VL-7B).
PAPER_N_ACC = {"sft": "3.3", "rlvr": "0 (in 90% of runs)", "sft_then_rlvr": "38.1", "visurf": "57.1"}  # Table 8
PAPER_FORGETS = {"sft": "forgets", "rlvr": "keeps", "sft_then_rlvr": "forgets", "visurf": "keeps"}  # Table 2
# Base tasks the study split does not train: the base split's grounding (targets only) and the
# existence questions of the base curriculum.
FORGETTING_METRICS = {"base_val": ("giou", "bbox_acc", "parse_fail_rate"),
                      "existence_val": ("balanced_accuracy", "absent_accuracy", "parse_fail_rate")}
SETTLING_KEYS = ("reward/total", "study/rollout_empty_frac", "entropy", "loss")


def forgetting(base: dict, runs: list[dict]) -> dict:
    """Each method's scores on the base tasks (``FORGETTING_METRICS``) before (the base model) and
    after post-training: {eval: {"before": {metric: x}, "after": {method: {metric: mean_std}}}}."""
    out = {}
    for name, metrics in FORGETTING_METRICS.items():
        before = base["evals"].get(name)
        if not before:
            continue
        out[name] = {"before": {m: before.get(m) for m in metrics}, "after": {}}
        for key, _, _ in METHODS:
            vals = [r["evals"][name] for r in runs if r["method"] == key and r["evals"].get(name)]
            if vals:
                out[name]["after"][key] = {m: mean_std([v.get(m) for v in vals]) for m in metrics}
    return out


def _window_mean(ys: list, lo: int, hi: int) -> Optional[float]:
    vals = [y for y in ys[lo:hi] if y is not None]
    return sum(vals) / len(vals) if vals else None


def settling(runs: list[dict], fraction: float = 0.2) -> dict:
    """Have the training curves flattened? For each method and curve: the mean over the first, the
    second-to-last and the last ``fraction`` of the steps (each averaged over seeds). A settled
    curve has last ~ previous while first -> last may have moved a lot."""
    out: dict = {}
    for key, _, _ in METHODS:
        mine = [r["curves"] for r in runs if r["method"] == key]
        for curve in SETTLING_KEYS:
            series = [c[curve] for c in mine if c.get(curve) and any(v is not None for v in c[curve])]
            if not series:
                continue
            n = min(len(ys) for ys in series)
            w = max(1, int(n * fraction))
            windows = {}
            for name, lo in (("first", 0), ("previous", n - 2 * w), ("last", n - w)):
                means = [_window_mean(ys, lo, lo + w) for ys in series]
                means = [m for m in means if m is not None]
                windows[name] = sum(means) / len(means) if means else None
            out.setdefault(key, {})[curve] = windows | {"window": w, "steps": n}
    return out


def _cell(stat: dict, seeds: int) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    text = f"{100 * stat['mean']:.1f}"
    if seeds > 1 and stat["n"] > 1:
        text += f" ± {100 * stat['std']:.1f}"
    return text


def _reused_note(payload: dict) -> str:
    """With --resume, the wall time covers only this invocation: say which jobs came from earlier
    ones and what a fresh run adds up to: this wall time plus the reused jobs' own times."""
    t = payload["timing"]
    reused = t.get("reused_jobs") or []
    if not reused:
        return ""
    fresh = payload["wall_s"] + t["reused_s"]
    return (f"; {len(reused)} of the {t['jobs']} jobs were finished by earlier invocations of the "
            f"same command (`--resume`: {', '.join(reused)}), so a fresh run adds up to "
            f"about **{fresh / 60:.0f} min**")


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
        f"{len(payload['runs'])} post-training runs {payload['timing']['runs_s']:.0f} s; started {payload['started']})"
        + _reused_note(payload) + ".",
        "",
        f"Base model: tiny Qwen2.5-VL ({st['model_params']}) trained with SFT for {st['warmup_steps']} steps on "
        f"{st['warmup_train']} one-object scenes, then {st['base_steps']} steps on {st['base_train']} base-split "
        f"images (2-3 objects; every query names a present object; it never saw `[]`) mixed with "
        f"{st.get('existence_train', 0)} existence questions (yes/no, half of the named objects absent)"
        + (f", then {st['existence_steps']} steps (lr {st['existence_lr']}, {st['existence_prompts_per_step']} rows "
           f"per step) on the same existence questions, {st['existence_copies']} copies of each, mixed with the base split"
           if st.get("existence_steps") else "")
        + ". Images are "
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
        "| Method | gIoU | cIoU | N-Acc | T-Acc | bbox acc | parse fail | paper N-Acc (Table 8) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in PARADIGM_ROWS:
        if key in s:
            n = 1 if key == "base" else seeds
            lines.append(f"| {LABELS[key]} | " + " | ".join(_cell(s[key][m], n) for m in METRICS)
                         + f" | {PAPER_N_ACC.get(key, '')} |")
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
    lines += (_premise_lines(payload) + _empty_answer_lines(payload) + _forgetting_lines(payload)
              + _settling_lines(payload))
    lines += ["", "![bars and training curves](nonobject.png)", "",
              "Raw numbers (per run, with training curves): `results.json`. Rerun: the command above "
              "(`--quick` for a smoke run; `--work` keeps data, logs and predictions).", ""]
    if payload.get("reading"):
        lines += ["## Reading", "", payload["reading"].strip(), ""]
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    return "\n".join(lines)


def _premise_lines(payload: dict) -> list[str]:
    premise = payload.get("premise")
    if not premise:
        return []
    base = payload["summary"].get("base", {})
    first = [r["curves"]["study/rollout_empty_frac"][0] for r in payload["runs"]
             if r["method"] in ("rlvr", "visurf") and r["curves"].get("study/rollout_empty_frac")]
    lines = ["", "## Premise check: does the base model see absence, while never answering `[]`?", "",
             f"Linear probe of \"the named object is present\" on the hidden states at the last prompt token "
             f"(every layer), fitted on {premise['train_per_class']} + {premise['train_per_class']} study-train "
             f"prompts, scored on {premise['val_per_class']} + {premise['val_per_class']} held-out study-val prompts "
             "(balanced accuracy; chance 50 %):", "",
             "| Model | probe accuracy, held out | (fit) |", "| --- | ---: | ---: |"]
    for name, m in premise["models"].items():
        lines.append(f"| {name} | {pct(m['val_balanced_acc'])} | {pct(m['train_balanced_acc'])} |")
    n_acc = base.get("n_acc", {}).get("mean")
    existence = payload["base"]["evals"].get("existence_val")
    earlier = (payload.get("base_grounding") or {}).get("evals", {}).get("existence_val")
    if existence:
        lines += ["", "Existence questions (`Is there \"the red circle\" in the image?`, yes/no; part of the "
                      f"base curriculum), base model, greedy, {existence['count']} held-out scenes "
                      f"({existence['absent_count']} absent): balanced accuracy {pct(existence['balanced_accuracy'])} "
                      f"(present {pct(existence['present_accuracy'])}, absent {pct(existence['absent_accuracy'])}, "
                      f"no verdict {pct(existence['parse_fail_rate'])})"
                      + (f"; {pct(earlier['balanced_accuracy'])} after the grounding stage, before the last "
                         "(existence-heavy) stage." if earlier else ".")]
    hits = premise.get("named_object")
    if hits and hits["count"]:
        lines += ["", f"Does the base model read the query? On the base val split ({hits['count']} scenes of "
                      f"2-3 objects), its box lands on the named object in {pct(hits['named'])} and on another "
                      f"object in {pct(hits['other'])} of the scenes; picking an object at random would land on "
                      f"the named one {pct(hits['random_pick_named'])} of the time when it lands on an object."]
    lines += ["", f"Behaviour of the base model: greedy N-Acc {pct(n_acc)} on the study val split"
              + (f"; sampled rollouts (T = 1) answering `[]` at the first RL step: {pct(sum(first) / len(first))} "
                 f"(mean over the {len(first)} RLVR and ViSurf runs)." if first else ".")]
    return lines


def empty_answer_rates(runs: list[dict], no_object_fraction: float, fraction: float = 0.2) -> dict:
    """Per method, over the last ``fraction`` of the steps (mean over seeds): the share of sampled
    rollouts answering ``[]`` when the named object is absent and when it is present, from the two
    logged shares (all ``[]`` answers, correct ones) and the split's no-object fraction f:
    P([] | absent) = correct / f,  P([] | present) = (all - correct) / (1 - f)."""
    out = {}
    for key, _, _ in METHODS:
        rates = []
        for r in runs:
            c = r["curves"]
            if r["method"] != key or not c.get("study/rollout_empty_frac"):
                continue
            n = len(c["study/rollout_empty_frac"])
            w = max(1, int(n * fraction))
            every = _window_mean(c["study/rollout_empty_frac"], n - w, n)
            correct = _window_mean(c["study/rollout_correct_empty_frac"], n - w, n)
            if every is not None and correct is not None:
                rates.append((correct / no_object_fraction, (every - correct) / (1 - no_object_fraction)))
        if rates:
            out[key] = {"absent": mean_std([a for a, _ in rates]), "present": mean_std([p for _, p in rates])}
    return out


def _empty_answer_lines(payload: dict) -> list[str]:
    rates = empty_answer_rates(payload["runs"], payload["settings"]["no_object_fraction"])
    if not rates:
        return []
    seeds = payload["settings"]["seeds"]
    lines = ["", "## Do the rollouts answer `[]` where the object is absent?", "",
             "Sampled rollouts (T = 1) in the last fifth of the steps: the share answering `[]` when the named "
             "object is absent and when it is present (from the logged shares of all and of correct `[]` answers "
             f"and the split's {100 * payload['settings']['no_object_fraction']:.0f}% no-object queries). A model "
             "that tells absence answers `[]` far more often on the left.", "",
             "| Method | P(`[]` \\| absent) | P(`[]` \\| present) |", "| --- | ---: | ---: |"]
    for key, label, _ in METHODS:
        if key in rates:
            lines.append(f"| {label} | {_cell(rates[key]['absent'], seeds)} | {_cell(rates[key]['present'], seeds)} |")
    return lines


def _forgetting_lines(payload: dict) -> list[str]:
    f = payload.get("forgetting")
    if not f:
        return []
    seeds = payload["settings"]["seeds"]
    lines = ["", "## Forgetting (paper Table 2 in miniature): the base tasks before and after", "",
             "Neither is trained during the study. Base val: 2-3 objects, every query names a present object "
             "(grounding, never `[]`). Existence: the base curriculum's yes/no questions, balanced accuracy. "
             "Before = the base model.", "",
             "| Method | base gIoU before → after | base bbox acc before → after | existence before → after "
             "| existence, absent class, before → after | paper (Table 2) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]

    def cell(name, metric, key):
        part = f.get(name)
        if not part or key not in part["after"]:
            return "n/a"
        return f"{pct(part['before'][metric])} → {_cell(part['after'][key][metric], seeds)}"

    for key, label, _ in METHODS:
        if any(key in part["after"] for part in f.values()):
            lines.append(f"| {label} | {cell('base_val', 'giou', key)} | {cell('base_val', 'bbox_acc', key)} | "
                         f"{cell('existence_val', 'balanced_accuracy', key)} | "
                         f"{cell('existence_val', 'absent_accuracy', key)} | {PAPER_FORGETS.get(key, '')} |")
    return lines


def _settling_lines(payload: dict) -> list[str]:
    st = payload.get("settling")
    if not st:
        return []
    lines = ["", "## Have the curves settled?", "",
             "Mean over the first, the second-to-last and the last fifth of the steps (mean over seeds); "
             "settled: last ≈ previous.", "",
             "| Method | curve | first | previous | last |", "| --- | --- | ---: | ---: | ---: |"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for key, label, _ in METHODS:
        for curve, w in st.get(key, {}).items():
            lines.append(f"| {label} | {curve} | {fmt(w['first'])} | {fmt(w['previous'])} | {fmt(w['last'])} |")
    return lines


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


