"""Per-token log-probs and entropy from vocab-parallel logits, run through megatron's schedules.

No rank ever materialises the full vocabulary: maxima, normalisers and the target logit are
reduced over the tensor-parallel group (megatron's ``reduce_from_tensor_model_parallel_region``
is an all-reduce forward and the identity backward, exactly what a sum over vocabulary shards needs).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_model_config

from .batching import MicroBatch, SharedVision
from .packing import unpack_rows


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, with_entropy: bool = False, entropy_grad: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(label) [B, S] and optionally the entropy H(pi) [B, S] from logits [B, S, V/tp].

        logp = l_y - logsumexp(l)          H = logsumexp(l) - sum_v softmax(l)_v l_v

    ``entropy_grad=False``: the entropy is a metric only (no entropy bonus in the loss), computed
    without autograd, so the [B, S, V/tp] softmax it needs is not kept for the backward pass.
    """
    logits = logits.float()
    vocab_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    local_max = logits.detach().max(dim=-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - local_max.unsqueeze(-1)
    log_z = torch.log(reduce_from_tensor_model_parallel_region(shifted.exp().sum(-1)))
    in_shard = (labels >= start) & (labels < start + vocab_local)
    local_label = (labels - start).clamp(0, vocab_local - 1)
    target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1) * in_shard
    logp = reduce_from_tensor_model_parallel_region(target) - log_z
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            probs = torch.exp(shifted - log_z.unsqueeze(-1))
            entropy = log_z - reduce_from_tensor_model_parallel_region((probs * shifted).sum(-1))
    return logp, entropy


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model chunk's parameters live (the device its inputs must be on)."""
    for param in model.parameters():
        return param.device
    raise ValueError(f"{type(model).__name__} has no parameters to tell its device")


def _innermost(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's wrappers (DistributedDataParallel, Float16Module)."""
    while hasattr(module, "module"):
        module = module.module
    return module


@contextlib.contextmanager
def shared_vision_pass(model_chunks: Sequence[torch.nn.Module], shared: Optional[SharedVision], *,
                       forward_only: bool):
    """Encode an update's images once, for every micro-batch of the schedule run inside.

    Yields the vision output on the first pipeline stage (None elsewhere, or without ``shared``).
    For training it yields a detached copy that requires grad: each micro-batch's backward adds
    its rows' gradients into that copy's ``.grad``, and the vision tower's one backward, with the
    sum, runs inside the schedule just before its gradient finalisation (DP all-reduce), by
    wrapping ``config.finalize_model_grads_func`` for the duration. The gradients are exactly what
    backpropagating through a fresh pass per micro-batch gives (sums of the same terms)."""
    model = _innermost(model_chunks[0])
    if shared is None or not getattr(model, "pre_process", False) or getattr(model, "vision_model", None) is None:
        yield None
        return
    device = model_device(model)
    pixels, grid = shared.pixel_values.to(device), shared.image_grid_thw.to(device)
    if forward_only:
        with torch.no_grad():
            embeds = model.vision_model(pixels, grid)
        yield embeds
        return
    embeds = model.vision_model(pixels, grid)
    if not embeds.requires_grad:  # a frozen vision tower and merger: nothing flows back
        yield embeds
        return
    leaf = embeds.detach().requires_grad_(True)
    config = get_model_config(model_chunks[0])
    finalize = config.finalize_model_grads_func
    pending = [True]

    def backward_vision():
        if pending and leaf.grad is not None:
            embeds.backward(leaf.grad)
        pending.clear()

    def backward_vision_then_finalize(*args, **kwargs):
        backward_vision()
        if finalize is not None:
            return finalize(*args, **kwargs)
        return None

    config.finalize_model_grads_func = backward_vision_then_finalize
    try:
        yield leaf
    finally:
        config.finalize_model_grads_func = finalize
    backward_vision()  # only where the schedule ran without finalising (no exception got here)


LossFn = Callable[[MicroBatch, torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, dict]]


def run_micro_batches(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> list[dict]:
    """One pass of megatron's forward(-backward) schedule over the micro-batches.

    ``loss_fn(micro_batch, logp, entropy) -> (loss, outputs)`` runs on the last pipeline stage;
    the returned list holds each micro-batch's ``outputs`` there (empty on other stages).
    All micro-batches must share one shape (``batching.padded_length``, ``packing.stream_length``);
    ``loss_fn`` always receives per-row [R, L] log-probs (packed streams are unpacked). Micro-batches may be
    anywhere (they are collated on the CPU): this is the one place that moves each of them to the
    model's device, and ``loss_fn`` receives the moved one. ``entropy_grad=False`` computes the
    entropy as a metric only (see ``vocab_parallel_logprobs``).
    """
    batches = list(micro_batches)
    iterator = iter(batches)
    shared = next((mb.shared_vision for mb in batches if mb.shared_vision is not None), None)
    if any(mb.shared_vision not in (None, shared) for mb in batches):
        raise ValueError("the micro-batches of one schedule run must share one SharedVision")
    image_embeds = None

    def forward_step(data_iterator, model):
        mb = next(data_iterator).to(model_device(model))
        packed = {}
        if mb.packed:
            packed = dict(cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen, image_embed_index=mb.image_embed_index)
            if mb.shared_vision is not None:
                packed["image_embeds"] = image_embeds
        output = model(mb.input_ids, mb.position_ids, mb.pixel_values, mb.image_grid_thw, temperature=temperature,
                       **packed)

        def loss_func(logits):
            logp, entropy = vocab_parallel_logprobs(logits, mb.labels, with_entropy=with_entropy,
                                                    entropy_grad=entropy_grad)
            if mb.packed:  # the stream [1, T] -> the per-row layout [R, L] the loss reads
                logp = unpack_rows(logp, mb.pack_index)
                entropy = unpack_rows(entropy, mb.pack_index) if entropy is not None else None
            loss, outputs = loss_fn(mb, logp, entropy)
            return loss, outputs

        return output, loss_func

    shape = batches[0].input_ids.shape
    with shared_vision_pass(model_chunks, shared, forward_only=forward_only) as image_embeds:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator if len(model_chunks) == 1 else [iterator] * len(model_chunks),
            model=list(model_chunks),
            num_microbatches=len(batches),
            seq_length=shape[1],
            micro_batch_size=shape[0],
            forward_only=forward_only,
        )
