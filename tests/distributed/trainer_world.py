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


def gt_style_auto_step(base: dict, overrides: list[str]) -> dict:
    """``gt_style: auto``: the scores of the first batch, then one real step (which chooses the style)."""
    import copy

    from visurf_megatron.training.gt_style_choice import score_gt_styles
    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(_config(base, overrides))
    feed = copy.deepcopy(trainer.feed)
    samples = feed.next_batch()
    prompts = [trainer.preparer(s) for s in samples]
    scores = score_gt_styles(trainer.chunks, prompts, trainer.gt_style_candidates, tokenizer=trainer.tokenizer,
                             end_of_turn_id=trainer.end_of_turn_id, image_token_id=trainer.extras.image_token_id,
                             pad_id=trainer.pad_id, spatial_merge_size=trainer.extras.spatial_merge_size,
                             micro_batch_size=2)
    before = trainer.gt_style
    trainer.train_step()
    gt_texts = [s["text"] for s in trainer._last_samples if s["is_gt"]]
    trainer.logger.close()
    return {"sample_ids": [s.id for s in samples], "scores": scores, "before": before, "chosen": trainer.gt_style,
            "trainer_scores": trainer.gt_style_scores, "gt_texts": gt_texts,
            "train_state": trainer.train_state()}


def vllm_steps(base: dict, overrides: list[str], steps: int) -> dict:
    """``steps`` train steps with the vLLM engine; per rank: metrics, a fingerprint of the rows it
    trained on at each step, its place in the layout and how many requests its replica generated."""
    import hashlib

    from megatron.core import parallel_state

    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(_config(base, overrides))
    history, fingerprints = [], []
    for _ in range(steps):
        metrics = trainer.train_step()
        trainer.step += 1
        history.append({k: v for k, v in metrics.items() if not k.startswith("time/") and "throughput" not in k})
        rows = [(r.prompt, tuple(r.response_ids), r.is_gt, r.engine_logprobs and tuple(r.engine_logprobs))
                for r in trainer._rows_for_metrics]
        fingerprints.append(hashlib.sha256(repr(rows).encode()).hexdigest())
    out = dict(history=history, fingerprints=fingerprints, requests_generated=trainer.engine.requests_generated,
               dp_rank=parallel_state.get_data_parallel_rank(), tp_rank=parallel_state.get_tensor_model_parallel_rank(),
               engine_tp=trainer.engine.tensor_parallel_size)
    trainer.close()
    return out


def engine_lifetime(base: dict, overrides: list[str]) -> dict:
    """When the trainer builds its rollout engine, and whether it is asleep (holding no memory)."""
    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(_config(base, overrides))
    out = {"after_init": None if trainer.engine is None else sorted(trainer.engine.state.asleep)}
    trainer.train_step()
    trainer.step += 1
    out["after_step"] = None if trainer.engine is None else sorted(trainer.engine.state.asleep)
    trainer.sync_weights()  # what an evaluation does: the engine appears, awake
    out["after_sync"] = None if trainer.engine is None else sorted(trainer.engine.state.asleep)
    trainer.close()
    return out
