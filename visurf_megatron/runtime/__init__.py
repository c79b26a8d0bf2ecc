"""Launch-side runtime: distributed initialisation, model-parallel groups, CPU shim.

Names are resolved lazily (PEP 562): ``runtime.torchvision_shim`` is imported at every interpreter
start of the CPU environment (a ``.pth`` hook) and must not pull torch in through this package.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DistEnv": "distributed",
    "DistributedEnvError": "distributed",
    "first_slurm_host": "distributed",
    "init_distributed": "distributed",
    "read_dist_env": "distributed",
    "seed_everything": "distributed",
    "setup_model_parallel": "distributed",
    "teardown": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
