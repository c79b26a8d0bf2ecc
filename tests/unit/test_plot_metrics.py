"""tools/plot_metrics.py: synthetic metrics.jsonl files -> valid PNGs, one per metric."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the eval extra (pip install -e '.[eval]')")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tools.plot_metrics as pm  # noqa: E402


def write_run(path: Path, steps: int, scale: float, extra_bad: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(steps):
        row = {"step": step, "reward/total": scale * (1 - math.exp(-step / 5)), "entropy": 1.0 / (1 + step),
               "adv/gt_mean": 0.5 * math.cos(step), "smooth/frac": step / steps, "loss": float("nan") if step == 3
               else 0.1 * step, "grad_norm": 1.0, "flag": True, "note": "text", "time/step_s": 12.5}
        if step % 2:
            row["reward/gt_total"] = 6.0  # present on some lines only
        lines.append(json.dumps(row))
    if extra_bad:
        lines += ["not json", "[1, 2]", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG"


def test_load_is_tolerant(tmp_path, capsys):
    series = pm.load_metrics(write_run(tmp_path / "a" / "metrics.jsonl", 6, 1.0, extra_bad=True))
    assert "warning: skipped 2 line(s)" in capsys.readouterr().err
    assert "flag" not in series and "note" not in series and "step" not in series
    xs, ys = series["loss"]
    assert 3.0 not in xs and len(ys) == 5  # the NaN is dropped
    assert series["reward/gt_total"][0] == [1.0, 3.0, 5.0]
    assert pm.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_cli_requested_metrics_one_png_each(tmp_path):
    run_a = write_run(tmp_path / "runs" / "visurf" / "logs" / "metrics.jsonl", 20, 6.0)
    write_run(tmp_path / "runs" / "rlvr" / "metrics.jsonl", 15, 4.0)
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(run_a),
                           str(tmp_path / "runs" / "rlvr"), "--out", str(out),
                           "--metrics", "reward/total,entropy,adv/gt_mean", "--smooth", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["adv_gt_mean.png", "entropy.png", "reward_total.png"]
    assert all(is_png(out / name) for name in pngs)


def test_all_metrics_and_overview(tmp_path):
    runs = pm.load_runs([str(write_run(tmp_path / "x" / "logs" / "metrics.jsonl", 10, 1.0)),
                         str(write_run(tmp_path / "y" / "x" / "metrics.jsonl", 10, 2.0))])
    assert list(runs) == ["x", "y/x"]  # labels from directory names, made unique
    written = pm.plot(runs, tmp_path / "out")
    names = {p.name for p in written}
    expected = {"reward_total.png", "reward_gt_total.png", "entropy.png", "adv_gt_mean.png", "smooth_frac.png",
                "loss.png", "grad_norm.png", "time_step_s.png", "overview.png"}
    assert names == expected
    assert all(is_png(p) for p in written)


def test_missing_inputs_are_clear_errors(tmp_path):
    script = str(ROOT / "tools" / "plot_metrics.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr and "nope.jsonl" in proc.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(pm.MetricsError, match="no metrics.jsonl under"):
        pm.load_runs([str(tmp_path / "empty")])
    runs = pm.load_runs([str(write_run(tmp_path / "r" / "metrics.jsonl", 3, 1.0))])
    with pytest.raises(pm.MetricsError, match="found in no run"):
        pm.plot(runs, tmp_path / "o", metrics=["reward/nope"])
