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

from .mapping import MappingContext, ResolvedParam, ShardShapeError, _shape, hub_name, resolve_params, unwrap


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

    The shard shape each parameter would get is worked out by the transform on meta tensors of the
    HF shapes. Missing tensors and shape mismatches are errors naming every offending tensor.
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
        meta = [torch.empty(_shape(_source(hf_tensors, k)), dtype=param.dtype, device="meta") for k in keys]
        try:
            shape = tuple(r.mapping.transform.to_megatron(meta, tp_rank, tp_size, ctx).shape)
        except (ValueError, RuntimeError) as exc:  # e.g. a QKV tensor that fits no head geometry
            mismatched.append(f"{r.global_name}: {exc}")
            continue
        if shape != tuple(param.shape):
            mismatched.append(f"{r.global_name}: expected {tuple(param.shape)}, HF gives {shape}")
            continue
        reads.append(HFRead(r, param, keys))
    if mismatched:
        raise ValueError("shape mismatch: " + "; ".join(mismatched))
    return reads


def read_into(read: HFRead, hf_tensors, ctx: MappingContext) -> None:
    """Fill ``read.param`` with its shard (a lazy reader's rows/columns go straight into it)."""
    tp_rank, tp_size = _tp()
    param, transform = read.param, read.resolved.mapping.transform
    with torch.no_grad():
        if hasattr(hf_tensors, "get_slice") and hasattr(transform, "read_shard"):
            target = param.detach() if param.device.type == "cpu" and param.is_contiguous() else None
            try:
                shard = transform.read_shard([hf_tensors.get_slice(k) for k in read.keys], tp_rank, tp_size, ctx,
                                             out=target)
            except ShardShapeError as exc:  # checked before; only a file changed since could get here
                raise ValueError(f"{read.resolved.global_name}: expected {tuple(param.shape)}, "
                                 f"HF gives {exc.shape}") from None
            if target is not None:
                return
        else:
            shard = transform.to_megatron([hf_tensors[k] for k in read.keys], tp_rank, tp_size, ctx)
        param.copy_(shard.to(param.dtype))


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


class StreamedHFParams:
    """Reads each parameter from HF right before its first save and frees it after its last.

    Hooked into the dist-checkpoint save (``megatron_io.save_model(..., stream=...)``): the writer
    asks for one tensor at a time, so a rank holds the parameters in flight, not its whole shard.
    Parameters are found by their storage (every saved tensor is a view of one), and freed by
    emptying that storage: the model is only a container for the save afterwards.
    """

    def __init__(self, reads: list[HFRead], hf_tensors, ctx: MappingContext):
        self._hf, self._ctx = hf_tensors, ctx
        self._reads = {r.param.untyped_storage().data_ptr(): r for r in reads}
        self._left: dict[int, int] = {}  # storage -> writes still to come
        self._filled: set[int] = set()
        self._previous: Optional[int] = None

    def expect(self, tensors) -> None:
        """The tensors the save will write, each once (from its final plan)."""
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            if key in self._reads:
                self._left[key] = self._left.get(key, 0) + 1

    def before_write(self, tensor: torch.Tensor) -> None:
        """``tensor`` is about to be written; the one before it has been."""
        self._done_with_previous()
        key = tensor.untyped_storage().data_ptr()
        if key not in self._reads:
            return
        if key not in self._filled:
            read_into(self._reads[key], self._hf, self._ctx)
            self._filled.add(key)
        self._previous = key

    def close(self) -> None:
        self._done_with_previous()
        unread = [r.resolved.global_name for k, r in self._reads.items() if k in self._left and k not in self._filled]
        if unread:
            raise RuntimeError(f"{len(unread)} parameters were planned but never written: {', '.join(unread[:10])}")

    def _done_with_previous(self) -> None:
        key, self._previous = self._previous, None
        if key is None or key not in self._left:
            return
        self._left[key] -= 1
        if self._left[key] == 0:
            param = self._reads[key].param
            try:  # frees the memory under every view of the parameter, the saver's included
                param.untyped_storage().resize_(0)
            except RuntimeError:  # a storage torch did not allocate itself (not resizable): drop ours
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
