"""Read HF tensors into this rank's megatron shards through the mapping table.

Two steps, so that a converter can check everything before it writes anything and then read each
parameter only when it is about to be saved (``StreamedHFParams``):
``check_hf_tensors`` validates names and shard shapes from the checkpoint's headers alone;
``read_into`` reads one parameter's shard, straight into the parameter where the transform can.
``load_hf_state_dict_into`` does both for a whole model (trainer initialisation, tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .mapping import ResolvedParam, hub_name, resolve_params, unwrap
from .transforms import MappingContext, ShardShapeError, _shape


@dataclass(frozen=True)
class HFRead:
    """One parameter of this rank and the HF tensors (keys as the source names them) it is read from."""

    resolved: ResolvedParam
    param: torch.nn.Parameter
    keys: tuple[str, ...]


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _source(hf_tensors, key: str):
    """A lazy slice when the source has them (nothing is read), else the tensor itself."""
    return hf_tensors.get_slice(key) if hasattr(hf_tensors, "get_slice") else hf_tensors[key]


def check_hf_tensors(model_chunks, hf_tensors) -> list[HFRead]:
    """Every parameter of this rank with its HF keys, after checking names and shapes (no data read).

    The shard shape each parameter would get is worked out by the transform from the HF shapes.
    Missing tensors and shape mismatches are errors naming every offending tensor.
    """
    by_hub = {hub_name(k): k for k in hf_tensors.keys()}
    tp_rank, tp_size = _tp()
    resolved = resolve_params(model_chunks)
    missing = sorted({h for r, _ in resolved for h in r.hf_names if h not in by_hub})
    if missing:
        raise KeyError(f"{len(missing)} HF tensors missing from the checkpoint: {', '.join(missing[:20])}"
                       + (" ..." if len(missing) > 20 else ""))
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    reads, mismatched = [], []
    for r, param in resolved:
        keys = tuple(by_hub[h] for h in r.hf_names)
        try:
            shape = r.mapping.transform.shard_shape([_shape(_source(hf_tensors, k)) for k in keys], tp_rank, tp_size,
                                                    ctx)
        except ValueError as exc:  # e.g. a QKV tensor that fits no head geometry
            mismatched.append(f"{r.global_name}: {exc}")
            continue
        if shape != tuple(param.shape):
            mismatched.append(f"{r.global_name}: expected {tuple(param.shape)}, HF gives {shape}")
            continue
        reads.append(HFRead(r, param, keys))
    if mismatched:
        raise ValueError("shape mismatch: " + "; ".join(mismatched))
    return reads


def read_into(read: HFRead, hf_tensors, ctx: MappingContext, out: Optional[torch.Tensor] = None) -> None:
    """Fill ``out`` (default: ``read.param``) with the parameter's shard; a lazy reader's rows and
    columns go straight into it."""
    tp_rank, tp_size = _tp()
    transform = read.resolved.mapping.transform
    dest = read.param if out is None else out
    with torch.no_grad():
        if hasattr(hf_tensors, "get_slice") and hasattr(transform, "read_shard"):
            target = dest.detach() if dest.device.type == "cpu" and dest.is_contiguous() else None
            try:
                shard = transform.read_shard([hf_tensors.get_slice(k) for k in read.keys], tp_rank, tp_size, ctx,
                                             out=target)
            except ShardShapeError as exc:  # checked before; only a file changed since could get here
                raise ValueError(f"{read.resolved.global_name}: expected {tuple(read.param.shape)}, "
                                 f"HF gives {exc.shape}") from None
            if target is not None:
                return
        else:
            shard = transform.to_megatron([hf_tensors[k] for k in read.keys], tp_rank, tp_size, ctx)
        dest.copy_(shard.to(dest.dtype))


def load_hf_state_dict_into(model_chunks, hf_tensors) -> list[str]:
    """Copy this rank's shards out of ``hf_tensors`` (a mapping, either HF naming) into the chunks.

    ``hf_tensors`` needs ``keys()`` and ``__getitem__`` only, so a lazy safetensors reader works and
    only the tensors this rank owns are read; a reader with ``get_slice`` (``HFCheckpointReader``)
    lets split transforms read just this rank's rows or columns, straight into the parameters.
    Returns the Hub names consumed.
    """
    reads = check_hf_tensors(model_chunks, hf_tensors)
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)
    for read in reads:
        read_into(read, hf_tensors, ctx)
    return sorted({h for read in reads for h in read.resolved.hf_names})


class BufferPool:
    """Byte buffers kept by size for reuse, up to ``limit`` bytes in all (larger returns are freed).

    Parameters of one size recur layer after layer; reading each into memory the previous one of
    its size used avoids a fresh mapping, its page faults and its unmapping per parameter.
    """

    def __init__(self, limit: int):
        self.limit, self.pooled, self.held, self.peak = limit, 0, 0, 0
        self._free: dict[int, list[torch.Tensor]] = {}

    def take(self, nbytes: int) -> torch.Tensor:
        free = self._free.get(nbytes)
        if free:
            buffer = free.pop()
            self.pooled -= nbytes
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.held += nbytes
        self.peak = max(self.peak, self.held + self.pooled)
        return buffer

    def give(self, buffer: torch.Tensor) -> None:
        nbytes = buffer.numel()
        self.held -= nbytes
        if self.pooled + nbytes <= self.limit:
            self._free.setdefault(nbytes, []).append(buffer)
            self.pooled += nbytes


def _typed_buffer(pool: BufferPool, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes from ``pool``, the same memory as a contiguous tensor shaped and typed like ``like``)."""
    buffer = pool.take(like.numel() * like.element_size())
    return buffer, buffer.view(like.dtype).view(like.shape)


class StreamedHFParams:
    """Reads each parameter from HF right before its first save, into pooled memory, and hands the
    save that memory instead of the parameter.

    Hooked into the dist-checkpoint save (``megatron_io.save_model(..., stream=...)``): the writer
    asks for one tensor at a time, so a rank holds the parameters in flight (and the pool), never
    its whole shard. Parameters are found by their storage (every saved tensor is a view of one);
    they are never filled: the model is only the layout of the save. A saved tensor that is part of
    a parameter (the SwiGLU ``linear_fc1`` halves) is copied into pooled memory of its own size,
    since the writer would otherwise clone it into fresh memory.
    """

    def __init__(self, reads: list[HFRead], hf_tensors, ctx: MappingContext, pool_bytes: int = 512 << 20):
        self._hf, self._ctx = hf_tensors, ctx
        self._reads = {r.param.untyped_storage().data_ptr(): r for r in reads}
        self._left: dict[int, int] = {}  # storage -> writes still to come
        self._filled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storage -> (bytes, as the param)
        self._read: set[int] = set()
        self._previous: Optional[tuple[int, Optional[torch.Tensor]]] = None
        self.pool = BufferPool(pool_bytes)

    def expect(self, tensors) -> None:
        """The tensors the save will write, each once (from its final plan)."""
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            if key in self._reads:
                self._left[key] = self._left.get(key, 0) + 1

    def before_write(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` is to be written next (the one before it has been); returns what to write."""
        self._done_with_previous()
        key = tensor.untyped_storage().data_ptr()
        read = self._reads.get(key)
        if read is None:
            return tensor
        if read.param.storage_offset() != 0:  # not a storage of its own: fill the parameter itself
            if key not in self._read:
                read_into(read, self._hf, self._ctx)
                self._read.add(key)
            return tensor
        if key not in self._filled:
            self._filled[key] = _typed_buffer(self.pool, read.param)
            read_into(read, self._hf, self._ctx, out=self._filled[key][1])
            self._read.add(key)
        whole = self._filled[key][1]
        if tensor.shape == whole.shape and tensor.stride() == whole.stride() and tensor.storage_offset() == 0:
            self._previous = (key, None)
            return whole
        part_bytes, part = _typed_buffer(self.pool, tensor)
        part.copy_(whole.view(-1).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()))
        self._previous = (key, part_bytes)
        return part

    def read_names(self) -> list[str]:
        """The parameters read so far (global megatron names)."""
        return sorted(r.resolved.global_name for k, r in self._reads.items() if k in self._read)

    def close(self) -> None:
        self._done_with_previous()
        unread = [r.resolved.global_name for k, r in self._reads.items() if k in self._left and k not in self._read]
        if unread:
            raise RuntimeError(f"{len(unread)} parameters were planned but never written: {', '.join(unread[:10])}")

    def _done_with_previous(self) -> None:
        if self._previous is None:
            return
        (key, part), self._previous = self._previous, None
        if part is not None:
            self.pool.give(part)
        if key in self._left:
            self._left[key] -= 1
            if self._left[key] == 0:
                self.pool.give(self._filled.pop(key)[0])
