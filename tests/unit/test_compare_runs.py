"""tools/compare_runs.py: two fake evaluation directories -> the Table-1 style markdown and a valid PNG."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the eval extra (pip install -e '.[eval]')")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tools.compare_runs as cr  # noqa: E402


def fake_eval(directory: Path, benchmark: str, task: str, metrics: dict, headline) -> Path:
    """A directory as ``visurf_megatron.evaluate`` leaves it (only metrics.json matters here)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(
        {"benchmark": benchmark, "task": task, "headline": list(headline), "metrics": {**metrics, "count": 10}}))
    return directory


@pytest.fixture
def runs(tmp_path):
    g = ("giou", "ciou", "n_acc", "t_acc", "bbox_acc")
    sft = fake_eval(tmp_path / "sft", "reasonseg", "grounding",
                    {"giou": 0.5, "ciou": 0.4, "n_acc": None, "t_acc": 0.9, "bbox_acc": 0.6}, g)
    visurf = tmp_path / "visurf"  # a method directory with one sub-directory per benchmark
    fake_eval(visurf / "reasonseg", "reasonseg", "grounding",
              {"giou": 0.625, "ciou": 0.3, "n_acc": None, "t_acc": 1.0, "bbox_acc": 0.7}, g)
    fake_eval(visurf / "mathvista", "mathvista", "math", {"accuracy": 0.25}, ("accuracy",))
    return sft, visurf


def test_table_and_png(runs, tmp_path):
    out = tmp_path / "cmp"
    assert cr.main([str(r) for r in runs] + ["--out", str(out), "--title", "test"]) == 0
    md = (out / "compare.md").read_text()
    lines = md.strip().splitlines()
    # N-Acc is n/a in every run: dropped. Columns in first-seen order; best of each column bold.
    assert lines[0] == ("| method | reasonseg gIoU | reasonseg cIoU | reasonseg T-Acc | reasonseg bbox acc "
                        "| mathvista acc |")
    assert lines[2] == "| sft | 50.0 | **40.0** | 90.0 | 60.0 | – |"
    assert lines[3] == "| visurf | **62.5** | 30.0 | **100.0** | **70.0** | **25.0** |"
    with Image.open(out / "compare.png") as img:
        img.verify()
        assert img.format == "PNG"
    with Image.open(out / "compare.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_labels_metrics_and_errors(runs, tmp_path, capsys):
    out = tmp_path / "cmp2"
    assert cr.main([str(r) for r in runs] + ["--labels", "SFT,ViSurf", "--metrics", "giou", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| SFT | 50.0 |" in md and "| ViSurf | **62.5** |" in md and "cIoU" not in md
    assert cr.main([str(runs[0]), "--labels", "a,b", "--out", str(out)]) == 2
    assert cr.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{\"x\": 1}")
    assert cr.main([str(tmp_path / "bad"), "--out", str(out)]) == 2
    assert "not an evaluation metrics.json" in capsys.readouterr().err


def test_help_runs_as_a_script():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_runs.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Table 1" in res.stdout and "--labels" in res.stdout
