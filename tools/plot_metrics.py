#!/usr/bin/env python
"""Plot training curves from one or more metrics.jsonl files (one JSON object per line).

    python tools/plot_metrics.py runs/7b_visurf runs/7b_rlvr --out plots
    python tools/plot_metrics.py runs/a/logs/metrics.jsonl --out plots --metrics reward/total,entropy --smooth 10

A run is a metrics.jsonl file or a directory searched (recursively) for metrics.jsonl; its label is
its directory name (a "logs" directory is named by its parent). Every numeric key is a metric
(booleans, strings, NaN/inf and missing values are skipped); the x axis is ``step`` (the line number
when absent). Writes one PNG per metric with one line per run, named after the key
(``reward/total`` -> ``reward_total.png``), and, unless --metrics is given, ``overview.png``: the
panels of the paper's stability figures (reward, GT reward, entropy, A_gt, smoothing share, response
length) for the keys present. Lines that are not JSON objects are skipped with a warning.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OVERVIEW = ["reward/total", "reward/gt_total", "entropy", "adv/gt_mean", "smooth/frac", "response_length"]
X_KEY = "step"

Series = dict[str, tuple[list[float], list[float]]]


class MetricsError(RuntimeError):
    """An input is missing or unusable; the message says which."""


def find_metric_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob("metrics.jsonl"))
        if not found:
            raise MetricsError(f"no metrics.jsonl under {path}")
        return found
    raise MetricsError(f"no such file or directory: {path}")


def run_label(path: Path) -> str:
    parent = path.parent
    if parent.name == "logs" and parent.parent.name:
        parent = parent.parent
    return parent.name or path.stem


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_metrics(path: str | Path) -> Series:
    """{metric: (xs, ys)} for every numeric key of the file, finite values only."""
    series: Series = {}
    bad = 0
    with open(path) as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                bad += 1
                continue
            x = _number(row.get(X_KEY))
            x = float(lineno) if x is None else x
            for key, value in row.items():
                y = _number(value)
                if key == X_KEY or y is None:
                    continue
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(y)
    if bad:
        print(f"plot_metrics: warning: skipped {bad} line(s) of {path} that are not JSON objects", file=sys.stderr)
    return series


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1 = unchanged)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def metric_filename(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def _draw(ax, runs: dict[str, Series], key: str, window: int) -> bool:
    drawn = False
    for i, (label, series) in enumerate(runs.items()):
        if key not in series:
            continue
        xs, ys = series[key]
        color = f"C{i % 10}"
        if window > 1:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys, window), color=color, linewidth=1.6, label=label)
        drawn = True
    ax.set_title(key)
    ax.set_xlabel(X_KEY)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def load_runs(inputs: list[str]) -> dict[str, Series]:
    runs: dict[str, Series] = {}
    for item in inputs:
        for path in find_metric_files(item):
            label, depth = run_label(path), 2
            while label in runs:  # two runs with one directory name: prefix more of the path
                parts = path.parent.parts[-depth:]
                label = "/".join(parts) if depth <= len(path.parent.parts) else f"{label}#{len(runs)}"
                depth += 1
            runs[label] = load_metrics(path)
    return runs


def plot(runs: dict[str, Series], out_dir: str | Path, metrics: Optional[list[str]] = None,
         window: int = 1, overview: Optional[bool] = None) -> list[Path]:
    """Write the PNGs; returns their paths. ``metrics`` None: every metric present in any run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = sorted({key for series in runs.values() for key in series})
    if metrics is None:
        keys = present
    else:
        missing = [k for k in metrics if k not in present]
        if missing:
            raise MetricsError(f"metric(s) {missing} found in no run; available: {present}")
        keys = list(metrics)
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        _draw(ax, runs, key, window)
        fig.tight_layout()
        path = out_dir / f"{metric_filename(key)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    panels = [k for k in OVERVIEW if k in present]
    if (overview if overview is not None else metrics is None) and panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, key in zip(axes.flat, panels):
            _draw(ax, runs, key, window)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_JSONL", help="metrics.jsonl files or run directories")
    parser.add_argument("--out", required=True, help="output directory for the PNGs")
    parser.add_argument("--metrics", default=None, help="comma-separated keys to plot (default: every numeric key)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N", help="trailing moving average over N points")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    metrics = [k.strip() for k in args.metrics.split(",") if k.strip()] if args.metrics else None
    try:
        runs = load_runs(args.inputs)
        written = plot(runs, args.out, metrics, args.smooth)
    except (MetricsError, OSError) as exc:
        print(f"plot_metrics: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} PNG(s) for {len(runs)} run(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
