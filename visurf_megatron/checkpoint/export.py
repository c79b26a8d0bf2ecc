"""Stream a TP/PP-sharded model to one rank as HF tensors, one parameter at a time.

``mapping.iter_hf_tensors`` gives every rank every tensor (all-gather over TP, broadcast over PP):
what the rollout weight sync needs. A converter writes on one rank only, so here each owner of a
shard sends it to rank 0 point to point and rank 0 alone assembles the HF tensors: the other
ranks never hold a gathered tensor, and rank 0 holds one parameter's shards and its HF tensors at
a time. ``fetch``/``release`` hooks let the caller load a parameter just before it is sent and
free it right after (``megatron_io.ParameterLoader``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .mapping import MappingContext, Replicated, lookup, resolve_params, unwrap

DESTINATION = 0


@dataclass(frozen=True)
class PlannedParam:
    """One exported parameter as rank 0 sees it: where its shards live and what it becomes."""

    global_name: str
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[int, ...]  # global ranks holding its TP shards, in TP order (one if replicated)


def _exported(model_chunks):
    return [(r, p) for r, p in resolve_params(model_chunks) if r.mapping.export]


def senders(model_chunks) -> list[torch.Tensor]:
    """This rank's parameters that it sends (or, on rank 0, uses), in sending order."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() != 0:
        return []
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return [p for r, p in _exported(model_chunks) if tp_rank == 0 or not isinstance(r.mapping.transform, Replicated)]


def plan(model_chunks) -> Optional[list[PlannedParam]]:
    """Collective: on rank 0, every exported parameter in stream order; None elsewhere."""
    from megatron.core import parallel_state

    mine = [(r.global_name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for r, p in _exported(model_chunks)]
    where = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_data_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (where, mine))
    if dist.get_rank() != DESTINATION:
        return None
    by_position = {w: (rank, params) for rank, (w, params) in enumerate(everyone) if w[2] == 0}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tied = unwrap(model_chunks[0]).extras.tie_word_embeddings
    out = []
    for stage in range(parallel_state.get_pipeline_model_parallel_world_size()):
        _, params = by_position[(stage, 0, 0)]
        for name, shape, dtype in params:
            replicated = isinstance(lookup(name, tied).mapping.transform, Replicated)
            ranks = tuple(by_position[(stage, t, 0)][0] for t in range(1 if replicated else tp))
            out.append(PlannedParam(name, shape, getattr(torch, dtype), ranks))
    return out


def hf_layout(planned: list[PlannedParam], ctx: MappingContext, tied: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every tensor the stream yields, in order (from meta tensors)."""
    out = []
    for p in planned:
        entry = lookup(p.global_name, tied)
        meta = [torch.empty(p.shard_shape, dtype=p.dtype, device="meta")] * len(p.sources)
        out.extend((h, tuple(t.shape), p.dtype) for h, t in zip(entry.hf_names, entry.mapping.transform.to_hf(meta, ctx)))
    return out


def stream_to_rank0(model_chunks, planned: Optional[list[PlannedParam]], *,
                    fetch: Callable[[torch.Tensor], torch.Tensor] = lambda p: p,
                    release: Callable[[torch.Tensor], None] = lambda p: None) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: rank 0 yields ``(hub_name, full tensor)`` for the whole model; other ranks send.

    ``planned`` is ``plan(model_chunks)`` (None off rank 0). Every rank must drain the iterator.
    """
    own = senders(model_chunks)
    me = dist.get_rank()
    if me != DESTINATION:
        for param in own:
            dist.send(fetch(param).detach().contiguous(), dst=DESTINATION)
            release(param)
        return
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    tied = unwrap(model_chunks[0]).extras.tie_word_embeddings
    device = next(unwrap(model_chunks[0]).parameters()).device  # nccl receives into GPU memory
    local = iter(own)
    for p in planned:
        shards = []
        for src in p.sources:
            if src == me:
                param = next(local)
                shards.append(fetch(param).detach())
            else:
                shards.append(torch.empty(p.shard_shape, dtype=p.dtype, device=device))
                dist.recv(shards[-1], src=src)
        entry = lookup(p.global_name, tied)
        tensors = entry.mapping.transform.to_hf(shards, ctx)
        del shards
        if any(src == me for src in p.sources):
            release(param)
        for name, tensor in zip(entry.hf_names, tensors):
            yield name, tensor
        del tensors
