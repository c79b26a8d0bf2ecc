"""The no-object study script (tools/study_nonobject.py) in --quick mode: it completes on 2 CPU ranks
and writes its three outputs. Only that: --quick numbers mean nothing (1 seed, a few steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
METHODS = {"sft", "rlvr", "sft_then_rlvr", "visurf", "visurf_no_align_gt", "visurf_no_gt_nothink", "visurf_no_smooth"}


@pytest.mark.timeout(900)
def test_quick_study_completes_and_writes_its_outputs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/study_nonobject.py", "--quick", "--out", str(out), "--work", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["profile"] == "quick" and payload["settings"]["seeds"] == 1
    assert {r["method"] for r in payload["runs"]} == METHODS
    steps = {r["steps"] for r in payload["runs"]}
    assert len(steps) == 1  # every method trained the same number of optimizer steps
    for run in payload["runs"]:
        m = run["metrics"]
        for key in ("giou", "ciou", "n_acc", "t_acc", "bbox_acc", "parse_fail_rate", "lib_n_acc"):
            assert key in m, (run["name"], key)
        assert m["count"] == payload["settings"]["study_val"]
        assert len(run["curves"]["step"]) == run["steps"]
    for method in METHODS | {"base"}:
        assert payload["summary"][method]["n_acc"]["n"] == 1
    assert payload["base"]["evals"]["base_val"]["no_target_count"] == 0  # the base split has no no-object query

    # The premise probe ran on both models; the forgetting table has every method; the settling
    # table has a reward curve for every method that rolls out.
    probe = payload["premise"]["models"]
    assert set(probe) == {"random init", "base"}
    assert all(0.0 <= m["val_balanced_acc"] <= 1.0 for m in probe.values())
    assert set(payload["forgetting"]["base_val"]["after"]) == METHODS
    assert set(payload["forgetting"]["existence_val"]["after"]) == METHODS
    assert payload["base"]["evals"]["existence_val"]["count"] == payload["settings"]["existence_val"]
    # The base curriculum: warm-up, grounding (existence mixed in), then the existence-heavy stage
    # that gives the base model; the two later stages are scored on the existence questions.
    assert [r["method"] for r in (payload["base_warmup"], payload["base_grounding"], payload["base"])] == [
        "base_warmup", "base_grounding", "base"]
    assert payload["base"]["steps"] == payload["settings"]["existence_steps"] > 0
    assert payload["base_grounding"]["evals"]["existence_val"]["count"] == payload["settings"]["existence_val"]
    for run in payload["runs"]:
        assert run["evals"]["base_val"]["no_target_count"] == 0
    assert {k for k, v in payload["settling"].items() if "reward/total" in v} == METHODS - {"sft"}

    md = (out / "nonobject.md").read_text()
    for heading in ("## Premise", "## Forgetting", "## Have the curves settled?"):
        assert heading in md
    assert "--quick smoke run" in md and "| ViSurf |" in md and "tools/study_nonobject.py" in md
    with Image.open(out / "nonobject.png") as img:
        assert img.format == "PNG" and img.size[0] > 500
    # --report-only re-renders the report from results.json alone (no training world).
    (out / "nonobject.md").unlink()
    again = subprocess.run([sys.executable, "tools/study_nonobject.py", "--report-only", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "nonobject.md").read_text() == md
    # Work files stay in --work, not in the repository's docs/ or outputs/.
    assert (work / "runs" / "visurf_seed0" / "predictions_study_val.jsonl").exists()
