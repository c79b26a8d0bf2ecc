#!/usr/bin/env python3
"""The GPU image's last build step: every framework imports, on one torch, at setup.py's pins.

Runs during `docker build`, where no GPU is visible: it checks imports and versions, not kernels
(tools/gpu_smoke.sh / tests/gpu run on a GPU). `pip check` follows it in the Dockerfile.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pins import canonical, exact_pins, image_requirements  # noqa: E402

MODULES = ("torch", "megatron.core", "transformer_engine.pytorch", "vllm", "sam2", "modelopt.torch",
           "visurf_megatron")


def main() -> int:
    failures = []
    for name in MODULES:
        try:
            importlib.import_module(name)
            print(f"import {name}: ok")
        except Exception as e:  # report every failure, not just the first
            failures.append(f"import {name}: {type(e).__name__}: {e}")

    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
          f"GPU visible: {torch.cuda.is_available()}")
    for key, line in sorted(exact_pins(image_requirements()).items()):
        want = line.split("==", 1)[1]
        try:
            got = md.version(key)
        except md.PackageNotFoundError:
            got = None
        if got is None or got.split("+", 1)[0] != want:
            failures.append(f"setup.py pins {line}, installed {got}")
    # One torch: exactly one distribution provides it, and vLLM's pin is the one installed.
    torches = [d for d in md.distributions() if canonical(d.metadata["Name"] or "") == "torch"]
    if len(torches) != 1:
        failures.append(f"{len(torches)} torch distributions installed")
    for dist in ("transformer-engine", "transformer-engine-torch", "transformer-engine-cu13", "vllm",
                 "megatron-core", "nvidia-modelopt", "sam2", "flashinfer-python"):
        try:
            print(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            failures.append(f"{dist} is not installed")
    try:
        md.version("apex")
        print("note: apex is installed (this image does not install it)")
    except md.PackageNotFoundError:
        pass
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
