"""Rank functions for tests/distributed/test_gpu_contracts.py (module-level so ``spawn`` can import them)."""
from __future__ import annotations

import torch


def entropy_at_temperature(hf_dir, batch, temperature):
    """Defect 7: log-probs and entropy at temperature T from the TP-sharded, vocab-padded model."""
    from megatron.core import parallel_state, tensor_parallel

    from tests.distributed.qwen_world import build_model
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids
    from visurf_megatron.training.forward import vocab_parallel_logprobs

    model, extras, _ = build_model(hf_dir, 2, 1, False)
    model.eval()
    pos, _ = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=extras.image_token_id,
                                spatial_merge_size=extras.spatial_merge_size, attention_mask=batch["attention_mask"])
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    with torch.no_grad():
        logits = model(batch["input_ids"], pos, batch["pixel_values"], batch["image_grid_thw"], temperature=temperature)
        logp, entropy = vocab_parallel_logprobs(logits, labels, with_entropy=True)
        fused = model(batch["input_ids"], pos, batch["pixel_values"], batch["image_grid_thw"], labels=labels,
                      temperature=temperature)
    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    return {"rank_holds_padding": start + local > extras.vocab_size, "padded_vocab": extras.padded_vocab_size,
            "vocab": extras.vocab_size, "local_logits_finite": bool(torch.isfinite(logits).all()),
            "logp": logp, "entropy": entropy, "fused_logp": fused,
            "full": tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., : extras.vocab_size]}


def fp8_padding_step(base: dict, overrides: list[str]) -> dict:
    """Defect 3: one trainer step with FP8 + sequence parallel; the shapes of every micro-batch the
    trainer built (update, old log-probs, GT-style scoring). Defect 8: how the update asks for the
    entropy (entropy_coef is 0 here). FP8 itself cannot run on CPU (no
    Transformer Engine: megatron's FP8 context is a no-op there); the padding rule is what is checked."""
    import copy

    import visurf_megatron.training.gt_style_choice as gt_style_choice
    import visurf_megatron.training.trainer as trainer_module
    from visurf_megatron.config import apply_overrides, from_dict

    shapes, updates = [], []

    def spy(fn, tag):  # calls through: records the micro-batch shapes, changes nothing
        def wrapped(chunks, micro, *args, **kwargs):
            shapes.append((tag, [tuple(mb.input_ids.shape) for mb in micro]))
            if not kwargs.get("forward_only", True):
                updates.append({k: kwargs.get(k) for k in ("with_entropy", "entropy_grad")})
            return fn(chunks, micro, *args, **kwargs)
        return wrapped

    trainer_module.run_micro_batches = spy(trainer_module.run_micro_batches, "update")
    gt_style_choice.run_micro_batches = spy(gt_style_choice.run_micro_batches, "gt_style")
    trainer = trainer_module.Trainer(from_dict(apply_overrides(copy.deepcopy(base), overrides)))
    metrics = trainer.train_step()
    trainer.logger.close()
    return {"shapes": shapes, "updates": updates, "loss": metrics["loss"], "entropy": metrics.get("entropy")}
