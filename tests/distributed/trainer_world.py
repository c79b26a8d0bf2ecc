"""Rank functions for the trainer tests (module-level so ``spawn`` can import them)."""
from __future__ import annotations

import math


def _config(base: dict, overrides: list[str]):
    from visurf_megatron.config import apply_overrides, from_dict

    import copy

    return from_dict(apply_overrides(copy.deepcopy(base), overrides))


def run_steps(base: dict, runs: list[list[str]], steps: int) -> list[list[dict]]:
    """For each override list: a fresh Trainer, ``steps`` train steps; the metrics of every step."""
    from visurf_megatron.training.trainer import Trainer

    results = []
    for overrides in runs:
        trainer = Trainer(_config(base, overrides))
        history = []
        for _ in range(steps):
            metrics = trainer.train_step()
            trainer.step += 1
            history.append({k: v for k, v in metrics.items() if not k.startswith("time/") and "throughput" not in k})
        trainer.logger.close()
        results.append(history)
    return results


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def train_run(base: dict, overrides: list[str]) -> None:
    """A whole ``Trainer.train()`` (checkpoints, resume, metrics.jsonl) as the CLI would run it."""
    from visurf_megatron.training.trainer import Trainer

    Trainer(_config(base, overrides)).train()
