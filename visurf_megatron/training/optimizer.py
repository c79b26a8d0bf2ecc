"""Megatron DDP + (distributed) Adam, constant LR with optional linear warm-up, as Megatron-LM does it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimizationState:
    model_chunks: list  # DDP-wrapped chunks (what the schedule and the checkpoint see)
    optimizer: object  # megatron MegatronOptimizer


def wrap_and_build_optimizer(model_chunks, train_cfg, parallel_cfg, params_dtype: torch.dtype) -> OptimizationState:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    bf16 = params_dtype == torch.bfloat16
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    wrapped = []
    for chunk in model_chunks:
        config = chunk.config
        if torch.cuda.is_available():
            chunk.cuda()
        module = Float16Module(config, chunk) if bf16 else chunk
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=module))
    config = model_chunks[0].config
    # The schedule calls these: DP grad reduction (+ SP norm grads, tied embeddings) and no_sync.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [w.no_sync for w in wrapped]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.grad_clip,
        bf16=bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    return OptimizationState(wrapped, optimizer)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Constant LR after a linear warm-up of ``warmup_steps`` (0 = constant from the start)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return base_lr
    return base_lr * (step + 1) / warmup_steps


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def guarded_step(optimizer, loss_is_finite: bool) -> tuple[bool, float]:
    """megatron's optimizer step with a non-finite check between the grad norm and the update.

    Same sequence as ``MegatronOptimizer.step`` (prepare grads -> norm -> clip by that norm -> step),
    but a NaN/inf loss or grad norm skips the update instead of spreading NaN into the weights.
    Returns (stepped, grad_norm). Collective: every rank reaches the same decision.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # found inf in the (scaled) grads
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def zero_grads(state: OptimizationState) -> None:
    for chunk in state.model_chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
