"""Quantised export on a GPU: NVFP4 (modelopt calibrates it on CUDA only) checked from the files, and
the FP8 export served by vLLM's ModelOpt loader. Skipped with a reason without CUDA / modelopt / vllm.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.integration.test_export_quantized import _tensors

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NVFP4 calibration, FP8 kernels)"),
    pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="needs nvidia-modelopt"),
]

REPO = Path(__file__).resolve().parents[2]
# E2M1 magnitudes by code (modelopt's table); codes 8..15 are the negatives.
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tools.make_synthetic_grounding import generate
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("export_gpu")
    # Head dims of 64 and 16-divisible widths: every FP8 / FP4 GPU kernel takes these shapes.
    hf = make_tiny_checkpoint(root / "hf", seed=5, init_std=0.2, vocab_size=512, hidden=128, heads=2, kv_heads=1,
                              intermediate=256, layers=2, vision_depth=2, vision_hidden=128, vision_heads=2,
                              vision_intermediate=256, dtype="bf16")
    data = generate(root / "data", train=12, val=0, size=56, seed=1, progress=False)["train"]
    return root, hf, data


def _export(assets, fmt: str) -> Path:
    from tools.export_quantized import main

    root, hf, data = assets
    out = root / fmt
    assert main([str(hf), str(out), "--format", fmt, "--data", str(data), "--calib-samples", "8",
                 "--eval-samples", "4", "--image-size", "56", "--device", "cuda", "--no-progress"]) == 0
    return out


def test_nvfp4_export_dequantises_within_fp4_rounding(assets):
    out = _export(assets, "nvfp4")
    report = json.loads((out / "export_report.json").read_text())
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    source, exported = _tensors(assets[1]), _tensors(out)
    assert report["modules"]["quantised"] and all(m.startswith("model.layers.") for m in report["modules"]["quantised"])
    for name in report["modules"]["quantised"]:
        packed, block, outer = (exported[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2"))
        w = source[f"{name}.weight"].float()
        rows, cols = w.shape
        assert packed.dtype == torch.uint8 and packed.shape == (rows, cols // 2)
        assert block.dtype == torch.float8_e4m3fn and block.shape == (rows, cols // 16)
        codes = torch.empty(rows, cols, dtype=torch.long)
        codes[:, 0::2], codes[:, 1::2] = (packed & 0x0F).long(), (packed >> 4).long()  # low nibble first
        scale = block.float().repeat_interleave(16, dim=1) * outer.float()
        err = (E2M1[codes] * scale - w).abs()
        # E2M1 has one mantissa bit: a value in range moves by at most 1/4 of itself, the smallest step
        # (0.5) by 0.25 of the block scale; the FP8 block scale's own rounding (2^-4) adds its share.
        bound = (0.25 + 2 ** -4) * w.abs() + 0.25 * scale + 1e-6
        assert bool((err <= bound).all()), f"{name}: max excess {float((err - bound).max())}"
    kept = [k for k in source if k.rsplit(".", 1)[0] not in report["modules"]["quantised"]]
    for key in kept:
        assert source[key].view(torch.uint8).equal(exported[key].contiguous().view(torch.uint8)), key
    fid = report["fidelity"]
    assert all(math.isfinite(fid[k]) for k in ("mean_kl_per_token", "top1_agreement")) and fid["mean_kl_per_token"] > 0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (setup.py's gpu extra)")
def test_vllm_serves_the_fp8_export(assets):
    out = _export(assets, "fp8")
    # A process of its own: vLLM's allocator and distributed state stay out of the other GPU tests.
    script = textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(out)!r}, quantization="modelopt", enforce_eager=True, gpu_memory_utilization=0.2,
                  max_model_len=1024, seed=0)
        outs = llm.generate(["<|im_start|>user\\nwhere is the red circle?<|im_end|>\\n<|im_start|>assistant\\n"],
                            SamplingParams(max_tokens=8, temperature=0.0))
        print("TOKENS", len(outs[0].outputs[0].token_ids))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    counts = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    assert counts and 1 <= counts[0] <= 8, run.stdout[-2000:]
