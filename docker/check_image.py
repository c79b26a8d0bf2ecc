#!/usr/bin/env python3
"""The GPU image's last build step: every framework imports, on one torch, at setup.py's pins, and
`pip check` finds nothing.

Runs during `docker build`, where no GPU (and no libcuda.so.1) is visible: it checks imports and
versions, not kernels (vLLM's own kernel modules need the driver; tests/gpu run on a GPU).

`pip check` reports one false positive, allowed here by name and cause only: the
transformer_engine_cu13 2.11.0 wheel is named py3-none-manylinux_2_28_x86_64, but the WHEEL file
inside it says `Tag: cp310-cp310-manylinux_2_28_x86_64`, so pip >= 23 calls it "not supported on
this platform" under Python 3.12 (seen installing the set in a CPython 3.12 venv on the dev machine).
Any other line fails the build.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pins import canonical, exact_pins, image_requirements  # noqa: E402

MODULES = ("torch", "megatron.core", "transformer_engine.pytorch", "vllm", "sam2", "modelopt.torch",
           "visurf_megatron")
# canonical name -> (version, the Tag its WHEEL file wrongly declares)
MISLABELLED_WHEELS = {"transformer-engine-cu13": ("2.11.0", "cp310-cp310-manylinux_2_28_x86_64")}


def pip_check() -> list[str]:
    """`pip check`'s complaints, less the known mislabelled wheel (verified, not just matched by text)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems, allowed = [], 0
    for line in (proc.stdout + proc.stderr).splitlines():
        if not line.strip() or line.startswith("No broken requirements"):
            continue
        m = re.fullmatch(r"(\S+) (\S+) is not supported on this platform", line.strip())
        if m and canonical(m.group(1)) in MISLABELLED_WHEELS:
            version, tag = MISLABELLED_WHEELS[canonical(m.group(1))]
            wheel = md.distribution(m.group(1)).read_text("WHEEL") or ""
            if m.group(2) == version and f"Tag: {tag}" in wheel:
                print(f"pip check: {line.strip()} -- known mislabel (its WHEEL file says {tag}), allowed")
                allowed += 1
                continue
        problems.append(f"pip check: {line}")
    if proc.returncode != 0 and not problems and not allowed:
        problems.append(f"pip check exited {proc.returncode} without saying why")
    if not problems:
        print("pip check: ok")
    return problems


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
    failures += pip_check()
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
