"""The transforms of the HF <-> Megatron mapping table (``mapping.py``), one per way a tensor is split.

Each serves both directions:

* ``to_megatron(hf_tensors, tp_rank, tp_size, ctx) -> this rank's shard``
* ``to_hf(shards of all TP ranks, ctx) -> hf_tensors``
* ``shard_shape(hf_shapes, tp_rank, tp_size, ctx)`` / ``hf_shapes(shard_shape, tp_size, ctx)``: the
  same geometry on shapes alone, so converters check and plan a checkpoint before touching data
* ``hf_pieces(this rank's shard, tp_rank, tp_size, ctx) -> [Piece]``: where each part of the shard
  lies in the HF tensors, so every rank can write its own part of a checkpoint in place
* ``read_shard(lazy HF slices, tp_rank, tp_size, ctx, out=None)`` (where the split allows it): read
  only this rank's rows or columns, straight into ``out``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class MappingContext:
    """Model geometry the transforms need (from ``Qwen25VLExtras``)."""

    vocab_size: int
    padded_vocab_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vision_num_heads: int
    vision_head_dim: int
    tie_word_embeddings: bool
    model_type: str = "qwen2_5_vl"  # the family, whose mapping table applies

    @classmethod
    def from_extras(cls, extras) -> "MappingContext":
        return cls(
            model_type=extras.model_type,
            vocab_size=extras.vocab_size,
            padded_vocab_size=extras.padded_vocab_size,
            num_attention_heads=extras.num_attention_heads,
            num_query_groups=extras.num_query_groups,
            head_dim=extras.head_dim,
            vision_num_heads=extras.vision_num_heads,
            vision_head_dim=extras.vision_head_dim,
            tie_word_embeddings=extras.tie_word_embeddings,
        )


def _shape(source) -> tuple[int, ...]:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def _chunk_range(length: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rows of TP rank ``tp_rank`` when ``length`` rows split evenly (as ``torch.chunk`` does then)."""
    if length % tp_size:
        raise ValueError(f"{length} rows do not split evenly over {tp_size} tensor-parallel ranks")
    per = length // tp_size
    return tp_rank * per, (tp_rank + 1) * per


class ShardShapeError(ValueError):
    """The HF tensors make a shard of another shape than the destination (found before reading)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        super().__init__(f"HF gives a shard of shape {self.shape}")


def _check_out(out: Optional[Tensor], shape) -> None:
    if out is not None and tuple(out.shape) != tuple(shape):
        raise ShardShapeError(shape)


def _check_read(transform, sources, tp_rank: int, tp_size: int, ctx, out: Optional[Tensor]) -> None:
    """Before ``read_shard`` reads: the sources' geometry fits (``shard_shape``) and so does ``out``."""
    _check_out(out, transform.shard_shape([_shape(s) for s in sources], tp_rank, tp_size, ctx))


def _read_range(source, dim: int, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
    """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor or a lazy safetensors slice.

    With ``out`` the result is written there (cast if needed) and ``out`` returned; a lazy slice
    reads rows or columns of the same dtype straight into it, so the shard never exists twice in
    memory and a column range is read without the other columns.
    """
    if out is not None and hasattr(source, "read_rows_into") and source.dtype == out.dtype and out.is_contiguous():
        if dim == 0:
            return source.read_rows_into(out, start, stop)
        if len(_shape(source)) == 2:
            return source.read_columns_into(out, start, stop)
    index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
    part = source[index]
    return part if out is None else out.copy_(part)


@dataclass(frozen=True)
class Piece:
    """What one TP rank holds of HF tensor ``index`` (of the entry's ``hf``), for writing in place.

    The HF tensor is seen as a matrix (dim 0 x the product of the others): ``block`` (2-D, rows
    contiguous in memory) is its rows ``[row, row + len)`` and columns ``[col, col + width)``. The
    pieces of all TP ranks together cover every element of the entry's HF tensors exactly once,
    and assemble to what ``to_hf`` returns (tested for every transform).
    """

    index: int
    row: int
    col: int
    block: Tensor


def as_matrix(tensor: Tensor) -> Tensor:
    """A view as (dim 0) x (the rest); a scalar is 1 x 1, a vector a column."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


class Replicated:
    """Same full tensor on every TP rank (norms, row-parallel biases, conv patch embedding)."""

    def to_megatron(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, ctx: MappingContext) -> Tensor:
        return hf[0]

    def to_hf(self, shards: Sequence[Tensor], ctx: MappingContext) -> list[Tensor]:
        return [shards[0]]

    def shard_shape(self, hf_shapes, tp_rank, tp_size, ctx) -> tuple[int, ...]:
        return tuple(hf_shapes[0])

    def hf_shapes(self, shard_shape, tp_size, ctx) -> list[tuple[int, ...]]:
        return [tuple(shard_shape)]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx) -> list[Piece]:
        return [Piece(0, 0, 0, as_matrix(shard))] if tp_rank == 0 else []

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        shape = _shape(sources[0])
        _check_out(out, shape)
        if not shape:  # a scalar has no rows to range over
            value = sources[0].read() if hasattr(sources[0], "read") else sources[0]
            return value if out is None else out.copy_(value)
        return _read_range(sources[0], 0, 0, shape[0], out)


@dataclass(frozen=True)
class Split:
    """Contiguous TP split along ``dim``: 0 for column-parallel outputs, 1 for row-parallel inputs."""

    dim: int

    def to_megatron(self, hf, tp_rank, tp_size, ctx):
        return torch.chunk(hf[0], tp_size, dim=self.dim)[tp_rank]

    def to_hf(self, shards, ctx):
        return [torch.cat(list(shards), dim=self.dim)]

    def shard_shape(self, hf_shapes, tp_rank, tp_size, ctx):
        shape = list(hf_shapes[0])
        start, stop = _chunk_range(shape[self.dim], tp_rank, tp_size)
        shape[self.dim] = stop - start
        return tuple(shape)

    def hf_shapes(self, shard_shape, tp_size, ctx):
        shape = list(shard_shape)
        shape[self.dim] *= tp_size
        return [tuple(shape)]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        block = as_matrix(shard)
        if self.dim == 0:
            return [Piece(0, tp_rank * block.shape[0], 0, block)]
        return [Piece(0, 0, tp_rank * block.shape[1], block)]

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        _check_read(self, sources, tp_rank, tp_size, ctx, out)
        start, stop = _chunk_range(_shape(sources[0])[self.dim], tp_rank, tp_size)
        return _read_range(sources[0], self.dim, start, stop, out)


class VocabSplit:
    """Embedding / output rows: zero-pad to the TP-divisible vocabulary, split; trim on export."""

    def to_megatron(self, hf, tp_rank, tp_size, ctx):
        full = hf[0]
        self.shard_shape([tuple(full.shape)], tp_rank, tp_size, ctx)  # validates the vocabulary size
        pad = ctx.padded_vocab_size - ctx.vocab_size
        if pad:
            full = torch.cat([full, full.new_zeros((pad,) + tuple(full.shape[1:]))], dim=0)
        return torch.chunk(full, tp_size, dim=0)[tp_rank]

    def to_hf(self, shards, ctx):
        return [torch.cat(list(shards), dim=0)[: ctx.vocab_size]]

    def shard_shape(self, hf_shapes, tp_rank, tp_size, ctx):
        shape = tuple(hf_shapes[0])
        if shape[0] != ctx.vocab_size:
            raise ValueError(f"vocabulary tensor has {shape[0]} rows, config says {ctx.vocab_size}")
        start, stop = _chunk_range(ctx.padded_vocab_size, tp_rank, tp_size)
        return (stop - start,) + shape[1:]

    def hf_shapes(self, shard_shape, tp_size, ctx):
        return [(ctx.vocab_size,) + tuple(shard_shape[1:])]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        start = tp_rank * shard.shape[0]
        real = max(0, min(shard.shape[0], ctx.vocab_size - start))  # padding rows are not exported
        return [Piece(0, start, 0, as_matrix(shard[:real]))] if real else []

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        _check_read(self, sources, tp_rank, tp_size, ctx, out)
        start, stop = _chunk_range(ctx.padded_vocab_size, tp_rank, tp_size)
        real_stop = min(stop, ctx.vocab_size)
        real_start = min(start, real_stop)
        n_real = real_stop - real_start
        if out is not None:  # real rows, then the zero padding, in place
            _read_range(sources[0], 0, real_start, real_stop, out[:n_real])
            out[n_real:].zero_()
            return out
        real = _read_range(sources[0], 0, real_start, real_stop)
        pad = (stop - start) - n_real
        return torch.cat([real, real.new_zeros((pad,) + tuple(real.shape[1:]))]) if pad else real


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, head_dim: int) -> Tensor:
    """HF [q (H*d); k (G*d); v (G*d)] -> megatron [per group g: q heads of g (H/G*d), k_g (d), v_g (d)].

    Works for weights ([., hidden]) and biases ([.]) alike: only dim 0 is re-laid out.
    """
    rest = tuple(q.shape[1:])
    q = q.reshape(groups, -1, *rest)  # [G, H/G*d, ...]
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(fused: Tensor, groups: int, heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``interleave_qkv``."""
    rest = tuple(fused.shape[1:])
    per_group = fused.reshape(groups, (heads // groups + 2) * head_dim, *rest)
    q_width = heads // groups * head_dim
    q, k, v = torch.split(per_group, [q_width, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


@dataclass(frozen=True)
class GroupedQKV:
    """Fused QKV in megatron's grouped layout, TP-split by whole query groups.

    ``tower="language"``: HF has separate q/k/v projections (GQA).
    ``tower="vision"``: HF has one fused ``qkv`` laid out [q; k; v] over all heads (MHA, groups = heads).
    """

    tower: str

    def _geometry(self, ctx):
        if self.tower == "vision":
            return ctx.vision_num_heads, ctx.vision_num_heads, ctx.vision_head_dim
        return ctx.num_attention_heads, ctx.num_query_groups, ctx.head_dim

    def to_megatron(self, hf, tp_rank, tp_size, ctx):
        heads, groups, head_dim = self._geometry(ctx)
        self.shard_shape([tuple(t.shape) for t in hf], tp_rank, tp_size, ctx)  # validates the geometry
        q, k, v = torch.chunk(hf[0], 3, dim=0) if self.tower == "vision" else hf
        return torch.chunk(interleave_qkv(q, k, v, groups, head_dim), tp_size, dim=0)[tp_rank]

    def shard_shape(self, hf_shapes, tp_rank, tp_size, ctx):
        heads, groups, head_dim = self._geometry(ctx)
        if self.tower == "vision":
            fused = tuple(hf_shapes[0])
            q = k = v = (fused[0] // 3,) + fused[1:] if fused and fused[0] % 3 == 0 else (-1,)
        else:
            q, k, v = (tuple(s) for s in hf_shapes)
        if (q[0], k[0], v[0]) != (heads * head_dim, groups * head_dim, groups * head_dim) or not q[1:] == k[1:] == v[1:]:
            raise ValueError(f"QKV shapes {q}/{k}/{v} do not match {heads} heads, {groups} groups, "
                             f"head_dim {head_dim}")
        if groups % tp_size:
            raise ValueError(f"{groups} query groups do not split over {tp_size} tensor-parallel ranks")
        return ((heads + 2 * groups) * head_dim // tp_size,) + q[1:]

    def hf_shapes(self, shard_shape, tp_size, ctx):
        heads, groups, head_dim = self._geometry(ctx)
        rest = tuple(shard_shape[1:])
        if self.tower == "vision":
            return [((heads + 2 * groups) * head_dim,) + rest]
        return [(heads * head_dim,) + rest, (groups * head_dim,) + rest, (groups * head_dim,) + rest]

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        """Rank ``tp_rank``'s query groups, read row range by row range into their places in ``out``."""
        heads, groups, head_dim = self._geometry(ctx)
        _check_read(self, sources, tp_rank, tp_size, ctx, out)
        if out is None:
            return self.to_megatron([_read_range(s, 0, 0, _shape(s)[0]) for s in sources], tp_rank, tp_size, ctx)
        q_rows, local = heads // groups * head_dim, groups // tp_size
        if self.tower == "vision":  # one fused [q; k; v] tensor
            parts = ((sources[0], 0), (sources[0], heads * head_dim), (sources[0], (heads + groups) * head_dim))
        else:
            parts = ((sources[0], 0), (sources[1], 0), (sources[2], 0))
        widths = (q_rows, head_dim, head_dim)
        for j in range(local):
            group, at = tp_rank * local + j, j * (q_rows + 2 * head_dim)
            for (source, base), width in zip(parts, widths):
                start = base + group * width
                _read_range(source, 0, start, start + width, out[at:at + width])
                at += width
        return out

    def to_hf(self, shards, ctx):
        heads, groups, head_dim = self._geometry(ctx)
        q, k, v = split_qkv(torch.cat(list(shards), dim=0), groups, heads, head_dim)
        return [torch.cat([q, k, v], dim=0)] if self.tower == "vision" else [q, k, v]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        heads, groups, head_dim = self._geometry(ctx)
        q_rows, local = heads // groups * head_dim, groups // tp_size
        per_group = as_matrix(shard).reshape(local, q_rows + 2 * head_dim, -1)
        # Language: separate q, k, v tensors; vision: one fused [q; k; v] tensor (row offsets).
        index, base = ((0, 0, 0), (0, heads * head_dim, (heads + groups) * head_dim)) if self.tower == "vision" \
            else ((0, 1, 2), (0, 0, 0))
        pieces = []
        for g, block in enumerate(per_group, start=tp_rank * local):
            parts = (block[:q_rows], block[q_rows:q_rows + head_dim], block[q_rows + head_dim:])
            starts = (g * q_rows, g * head_dim, g * head_dim)
            pieces.extend(Piece(i, b + r, 0, p) for i, b, r, p in zip(index, base, starts, parts))
        return pieces


class GatedMLP:
    """linear_fc1 = [gate_i; up_i] on TP rank i (each half split separately, not a chunk of [G; U])."""

    def to_megatron(self, hf, tp_rank, tp_size, ctx):
        gate, up = hf
        return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], dim=0)

    def to_hf(self, shards, ctx):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]

    def shard_shape(self, hf_shapes, tp_rank, tp_size, ctx):
        gate, up = (tuple(s) for s in hf_shapes)
        if gate != up:
            raise ValueError(f"gate {gate} and up {up} projections differ in shape")
        start, stop = _chunk_range(gate[0], tp_rank, tp_size)
        return (2 * (stop - start),) + gate[1:]

    def hf_shapes(self, shard_shape, tp_size, ctx):
        half = (shard_shape[0] // 2 * tp_size,) + tuple(shard_shape[1:])
        return [half, half]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        block = as_matrix(shard)
        half = block.shape[0] // 2
        return [Piece(0, tp_rank * half, 0, block[:half]), Piece(1, tp_rank * half, 0, block[half:])]

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        _check_read(self, sources, tp_rank, tp_size, ctx, out)
        ranges = [_chunk_range(_shape(src)[0], tp_rank, tp_size) for src in sources]
        rows = [stop - start for start, stop in ranges]
        if out is None:
            return torch.cat([_read_range(src, 0, *r) for src, r in zip(sources, ranges)])
        for src, (start, stop), begin in zip(sources, ranges, (0, rows[0])):
            _read_range(src, 0, start, stop, out[begin:begin + stop - start])
        return out


COLUMN, ROW, REPLICATED = Split(0), Split(1), Replicated()
