"""Write a TP/PP-sharded model as an HF checkpoint, every rank writing its own shards in place.

``mapping.iter_hf_tensors`` gives every rank every tensor (all-gather over TP, broadcast over PP):
what the rollout weight sync needs. A converter only needs the bytes on disk, and the HF layout
(files, headers, offsets) follows from names, shapes and dtypes alone (``hf_writer.ShardPlan``).
So every rank plans the same files and writes the parts of the HF tensors its shards make
(``Piece``s of the mapping's transforms) straight into them: no tensor crosses ranks, no rank ever
assembles a full tensor, and the ranks write at the same time. ``fetch``/``release`` hooks let the
caller load a parameter just before it is written and free it right after
(``megatron_io.ParameterLoader``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .hf_writer import SlotWriter
from .mapping import lookup, resolve_params, unwrap
from .transforms import MappingContext, Replicated


def _exported(model_chunks):
    return [(r, p) for r, p in resolve_params(model_chunks) if r.mapping.export]


def senders(model_chunks) -> list[torch.Tensor]:
    """This rank's parameters that it writes, in writing order (a replicated one by TP rank 0 only).

    Odd ranks go backwards: two processes writing into the same file take turns on its inode lock
    (measured: 4 GiB by two writers into one file 6.4-7.0 s, into two files 2.9-3.6 s), and
    tensor-parallel ranks write parts of the same tensors, so going in the same order they would
    share a file from the first tensor to the last.
    """
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() != 0:
        return []
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    mine = [p for r, p in _exported(model_chunks) if tp_rank == 0 or not isinstance(r.mapping.transform, Replicated)]
    return mine[::-1] if dist.get_rank() % 2 else mine


def hf_layout(model_chunks) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Collective: (HF name, shape, dtype) of every tensor of the whole model, the same on every rank.

    In pipeline-stage order, each stage's tensors in parameter order; shapes come from the
    transforms' ``hf_shapes`` of the shard shapes.
    """
    from megatron.core import parallel_state

    mine = [(r.global_name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for r, p in _exported(model_chunks)]
    where = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_data_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (where, mine))
    by_position = {w: params for w, params in everyone}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    out = []
    for stage in range(parallel_state.get_pipeline_model_parallel_world_size()):
        for name, shape, dtype in by_position[(stage, 0, 0)]:
            entry = lookup(name, ctx.tie_word_embeddings, ctx.model_type)
            shapes = entry.mapping.transform.hf_shapes(shape, tp, ctx)
            out.extend((h, hf_shape, getattr(torch, dtype)) for h, hf_shape in zip(entry.hf_names, shapes))
    return out


def write_own_parts(model_chunks, writer: SlotWriter, *,
                    fetch: Callable[[torch.Tensor], torch.Tensor] = lambda p: p,
                    release: Callable[[torch.Tensor], None] = lambda p: None,
                    progress: Callable[[Iterable], Iterable] = lambda it: it) -> int:
    """Write this rank's parts of the HF tensors into ``writer``'s files; returns the bytes written.

    No collectives: ranks may fail or finish independently (the caller checks the totals).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    resolved = {id(p): r for r, p in _exported(model_chunks)}
    before = writer.bytes_written
    with torch.no_grad():
        for param in progress(senders(model_chunks)):
            r = resolved[id(param)]
            for piece in r.mapping.transform.hf_pieces(fetch(param).detach(), tp_rank, tp_size, ctx):
                writer.write(r.hf_names[piece.index], piece.row, piece.col, piece.block)
            release(param)
    return writer.bytes_written - before
