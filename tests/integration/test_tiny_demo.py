"""The README's main job, end to end: examples/run_visurf_tiny.sh on 2 CPU ranks."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1200)
def test_tiny_demo_trains_visurf_and_rewards_rise(tmp_path):
    out = tmp_path / "tiny"
    env = dict(os.environ, OUT=str(out), SFT_STEPS="150", VISURF_STEPS="24", PY=str(REPO / ".venv" / "bin" / "python"))
    proc = subprocess.run(["bash", "examples/run_visurf_tiny.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary" in proc.stdout
    rows = [json.loads(line) for line in (out / "visurf" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    for key in ("reward/total", "reward/thinking", "reward/answer_format", "reward/accuracy", "reward/non_repeat",
                "reward_gt/total", "visurf/mean_adv_gt", "visurf/frac_groups_smoothed", "gt_logp",
                "update/clip_frac", "entropy", "response_length", "token_mult_prob_error", "grad_norm", "loss",
                "time/step_s", "time/generate_s", "time/update_s", "throughput/tokens_per_s", "lr"):
        assert all(r.get(key) is not None for r in rows), key
    first = sum(r["reward/total"] for r in rows[:8]) / 8
    last = sum(r["reward/total"] for r in rows[-8:]) / 8
    assert last > first, f"rollout reward did not rise: first 8 steps {first:.3f}, last 8 steps {last:.3f}"
    assert any((out / "visurf" / "logs" / "tensorboard").iterdir())
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(Image.open(p).format == "PNG" for p in pngs)
    # The converted-back model loads in transformers.
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "hf_final")
    assert sum(p.numel() for p in model.parameters()) > 0
