#!/usr/bin/env python
"""Put several evaluation runs side by side: the paper's Table 1 layout (one row per method, one
column per benchmark metric), as markdown and as a grouped bar chart (PNG).

    python tools/compare_runs.py runs/eval/sft runs/eval/rlvr runs/eval/visurf --out runs/compare
    python tools/compare_runs.py a/reasonseg b/reasonseg --labels SFT,ViSurf --metrics giou,ciou

Each DIR is either one evaluation output directory (``metrics.json``, written by
``python -m visurf_megatron.evaluate``) or a method directory whose sub-directories are evaluation
outputs (one per benchmark). A row's label is the directory's name unless ``--labels`` names them.
Columns are ``<benchmark> <metric>`` for each task's headline metrics (grounding: gIoU, cIoU, N-Acc,
T-Acc, bbox acc; gui: accuracy; anomaly: ROC-AUC, yes/no acc; math: accuracy; chartqa: relaxed
acc; docvqa: ANLS) unless ``--metrics`` picks keys; metrics that are n/a in every run are left out.
Values are percentages; the best value of each column is bold. Writes OUT/compare.md and
OUT/compare.png and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"giou": "gIoU", "ciou": "cIoU", "n_acc": "N-Acc", "t_acc": "T-Acc", "bbox_acc": "bbox acc",
         "roc_auc": "ROC-AUC", "acc": "acc", "accuracy": "acc", "relaxed_acc": "relaxed acc", "anls": "ANLS"}


class CompareError(RuntimeError):
    """An input is missing or unusable; the message says which."""


def find_evaluations(path: str | Path) -> list[dict]:
    """The ``metrics.json`` payloads of one run directory (itself or its sub-directories)."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"not a directory: {path}")
    files = [path / "metrics.json"] if (path / "metrics.json").is_file() else sorted(path.glob("*/metrics.json"))
    if not files:
        raise CompareError(f"no metrics.json in {path} or its sub-directories (run visurf_megatron.evaluate first)")
    out = []
    for f in files:
        try:
            payload = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CompareError(f"{f}: not JSON ({e.msg})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict) or "benchmark" not in payload:
            raise CompareError(f"{f}: not an evaluation metrics.json (needs 'benchmark' and 'metrics')")
        out.append(payload)
    return out


def _value(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def build_table(runs: list[tuple[str, list[dict]]], metrics: Optional[list[str]] = None):
    """(columns, rows): columns are (benchmark, metric key); rows (label, [value or None])."""
    columns: list[tuple[str, str]] = []
    for _, evals in runs:
        for ev in evals:
            keys = metrics if metrics else ev.get("headline") or [k for k in ev["metrics"] if k != "count"]
            for k in keys:
                if (ev["benchmark"], k) not in columns:
                    columns.append((ev["benchmark"], k))
    rows = []
    for label, evals in runs:
        by_bench = {ev["benchmark"]: ev["metrics"] for ev in evals}
        rows.append((label, [_value(by_bench.get(b, {}).get(k)) for b, k in columns]))
    keep = [i for i in range(len(columns)) if any(r[1][i] is not None for r in rows)]
    if not keep:
        raise CompareError("none of the requested metrics has a value in any run")
    return [columns[i] for i in keep], [(label, [vals[i] for i in keep]) for label, vals in rows]


def column_name(col: tuple[str, str]) -> str:
    return f"{col[0]} {NAMES.get(col[1], col[1])}"


def to_markdown(columns, rows) -> str:
    best = [max((r[1][i] for r in rows if r[1][i] is not None), default=None) for i in range(len(columns))]
    lines = ["| method | " + " | ".join(column_name(c) for c in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for label, vals in rows:
        cells = []
        for v, b in zip(vals, best):
            text = "–" if v is None else f"{100 * v:.1f}"
            cells.append(f"**{text}**" if v is not None and len(rows) > 1 and v == b else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(columns, rows, path: Path, title: str = "") -> Path:
    n_cols, n_rows = len(columns), len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n_cols * max(1, n_rows) ** 0.5 + 2), 4.5))
    width = 0.8 / n_rows
    for j, (label, vals) in enumerate(rows):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n_cols)]
        ys = [0.0 if v is None else 100 * v for v in vals]
        bars = ax.bar(xs, ys, width=width, label=label)
        for bar, v in zip(bars, vals):
            ax.annotate("–" if v is None else f"{100 * v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([column_name(c) for c in columns], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="evaluation output directories (or method directories of them)")
    p.add_argument("--labels", default=None, help="comma-separated row labels, one per run (default: directory names)")
    p.add_argument("--metrics", default=None, help="comma-separated metric keys, e.g. giou,ciou,n_acc (default: headline)")
    p.add_argument("--out", default="compare", help="output directory for compare.md and compare.png (default ./compare)")
    p.add_argument("--title", default="", help="chart title")
    a = p.parse_args(argv)
    try:
        labels = [s.strip() for s in a.labels.split(",")] if a.labels else [Path(r).resolve().name for r in a.runs]
        if len(labels) != len(a.runs):
            raise CompareError(f"--labels names {len(labels)} runs, {len(a.runs)} were given")
        seen: dict[str, int] = {}
        for i, label in enumerate(labels):  # two runs named "eval" stay apart
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                labels[i] = f"{label} ({seen[label]})"
        runs = [(label, find_evaluations(r)) for label, r in zip(labels, a.runs)]
        metrics = [m.strip() for m in a.metrics.split(",") if m.strip()] if a.metrics else None
        columns, rows = build_table(runs, metrics)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(columns, rows)
    (out / "compare.md").write_text(md, encoding="utf-8")
    plot(columns, rows, out / "compare.png", a.title)
    print(md)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
