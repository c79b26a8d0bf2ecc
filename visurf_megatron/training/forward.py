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

from .batching import MicroBatch
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

    def forward_step(data_iterator, model):
        mb = next(data_iterator).to(model_device(model))
        packed = {}
        if mb.packed:
            packed = dict(cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen, image_embed_index=mb.image_embed_index)
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
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterator if len(model_chunks) == 1 else [iterator] * len(model_chunks),
        model=list(model_chunks),
        num_microbatches=len(batches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
