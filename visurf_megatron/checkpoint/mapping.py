"""The one HF <-> Megatron parameter mapping for Qwen2.5-VL, declared once as a table.

Each entry names a megatron parameter (``*`` = layer index), the HF tensors it is made of (same
``*``), and a transform that serves both directions:

* ``to_megatron(hf_tensors, tp_rank, tp_size, ctx) -> this rank's shard``
* ``to_hf(shards of all TP ranks, ctx) -> hf_tensors``
* ``hf_pieces(this rank's shard, tp_rank, tp_size, ctx) -> [Piece]``: where each part of the shard
  lies in the HF tensors, so every rank can write its own part of a checkpoint in place

Converters, rollout weight sync and the tests all use this table; nothing else encodes the mapping.
HF names are kept in the Hub naming (``model.layers.*``, ``visual.*``, ``lm_head``); ``hub_name``
also accepts the in-memory naming of newer transformers (``model.language_model.*``, ``model.visual.*``).
"""
from __future__ import annotations

import re
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

    @classmethod
    def from_extras(cls, extras) -> "MappingContext":
        return cls(
            vocab_size=extras.vocab_size,
            padded_vocab_size=extras.padded_vocab_size,
            num_attention_heads=extras.num_attention_heads,
            num_query_groups=extras.num_query_groups,
            head_dim=extras.head_dim,
            vision_num_heads=extras.vision_num_heads,
            vision_head_dim=extras.vision_head_dim,
            tie_word_embeddings=extras.tie_word_embeddings,
        )


# --------------------------------------------------------------------------------------------
# Transforms


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


def _range_shape(source, dim: int, start: int, stop: int) -> tuple[int, ...]:
    shape = list(_shape(source))
    shape[dim] = stop - start
    return tuple(shape)


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

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        block = as_matrix(shard)
        if self.dim == 0:
            return [Piece(0, tp_rank * block.shape[0], 0, block)]
        return [Piece(0, 0, tp_rank * block.shape[1], block)]

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        start, stop = _chunk_range(_shape(sources[0])[self.dim], tp_rank, tp_size)
        _check_out(out, _range_shape(sources[0], self.dim, start, stop))
        return _read_range(sources[0], self.dim, start, stop, out)


class VocabSplit:
    """Embedding / output rows: zero-pad to the TP-divisible vocabulary, split; trim on export."""

    def to_megatron(self, hf, tp_rank, tp_size, ctx):
        full = hf[0]
        if full.shape[0] != ctx.vocab_size:
            raise ValueError(f"vocabulary tensor has {full.shape[0]} rows, config says {ctx.vocab_size}")
        pad = ctx.padded_vocab_size - ctx.vocab_size
        if pad:
            full = torch.cat([full, full.new_zeros((pad,) + tuple(full.shape[1:]))], dim=0)
        return torch.chunk(full, tp_size, dim=0)[tp_rank]

    def to_hf(self, shards, ctx):
        return [torch.cat(list(shards), dim=0)[: ctx.vocab_size]]

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        start = tp_rank * shard.shape[0]
        real = max(0, min(shard.shape[0], ctx.vocab_size - start))  # padding rows are not exported
        return [Piece(0, start, 0, as_matrix(shard[:real]))] if real else []

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        shape = _shape(sources[0])
        if shape[0] != ctx.vocab_size:
            raise ValueError(f"vocabulary tensor has {shape[0]} rows, config says {ctx.vocab_size}")
        start, stop = _chunk_range(ctx.padded_vocab_size, tp_rank, tp_size)
        _check_out(out, (stop - start,) + tuple(shape[1:]))
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
        q, k, v = torch.chunk(hf[0], 3, dim=0) if self.tower == "vision" else hf
        if q.shape[0] != heads * head_dim or k.shape[0] != groups * head_dim:
            raise ValueError(f"QKV shapes {tuple(q.shape)}/{tuple(k.shape)} do not match {heads} heads, "
                             f"{groups} groups, head_dim {head_dim}")
        return torch.chunk(interleave_qkv(q, k, v, groups, head_dim), tp_size, dim=0)[tp_rank]

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

    def hf_pieces(self, shard, tp_rank, tp_size, ctx):
        block = as_matrix(shard)
        half = block.shape[0] // 2
        return [Piece(0, tp_rank * half, 0, block[:half]), Piece(1, tp_rank * half, 0, block[half:])]

    def read_shard(self, sources, tp_rank, tp_size, ctx, out=None):
        ranges = [_chunk_range(_shape(src)[0], tp_rank, tp_size) for src in sources]
        rows = [stop - start for start, stop in ranges]
        _check_out(out, (sum(rows),) + tuple(_shape(sources[0])[1:]))
        if out is None:
            return torch.cat([_read_range(src, 0, *r) for src, r in zip(sources, ranges)])
        for src, (start, stop), begin in zip(sources, ranges, (0, rows[0])):
            _read_range(src, 0, start, stop, out[begin:begin + stop - start])
        return out


COLUMN, ROW, REPLICATED = Split(0), Split(1), Replicated()


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    hf: tuple[str, ...]
    transform: object
    # "untied" / "tied": only for that embedding layout. ``export=False``: loaded, never written
    # (the tied output layer on the last pipeline stage is a copy of the embedding).
    when: Optional[str] = None
    export: bool = True


_LM = "language_model.decoder.layers.*."
_HF_LM = "model.layers.*."
_VIS = "vision_model.decoder.layers.*."
_HF_VIS = "visual.blocks.*."

QWEN25_VL_MAPPING: tuple[ParamMapping, ...] = (
    # language model
    ParamMapping("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabSplit()),
    ParamMapping(_LM + "input_layernorm.weight", (_HF_LM + "input_layernorm.weight",), REPLICATED),
    ParamMapping(_LM + "self_attention.linear_qkv.layer_norm_weight", (_HF_LM + "input_layernorm.weight",), REPLICATED),
    ParamMapping(_LM + "self_attention.linear_qkv.weight",
                 tuple(_HF_LM + f"self_attn.{p}_proj.weight" for p in "qkv"), GroupedQKV("language")),
    ParamMapping(_LM + "self_attention.linear_qkv.bias",
                 tuple(_HF_LM + f"self_attn.{p}_proj.bias" for p in "qkv"), GroupedQKV("language")),
    ParamMapping(_LM + "self_attention.linear_proj.weight", (_HF_LM + "self_attn.o_proj.weight",), ROW),
    ParamMapping(_LM + "pre_mlp_layernorm.weight", (_HF_LM + "post_attention_layernorm.weight",), REPLICATED),
    ParamMapping(_LM + "mlp.linear_fc1.layer_norm_weight", (_HF_LM + "post_attention_layernorm.weight",), REPLICATED),
    ParamMapping(_LM + "mlp.linear_fc1.weight", (_HF_LM + "mlp.gate_proj.weight", _HF_LM + "mlp.up_proj.weight"), GatedMLP()),
    ParamMapping(_LM + "mlp.linear_fc2.weight", (_HF_LM + "mlp.down_proj.weight",), ROW),
    ParamMapping("language_model.decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    ParamMapping("language_model.output_layer.weight", ("lm_head.weight",), VocabSplit(), when="untied"),
    ParamMapping("language_model.output_layer.weight", ("model.embed_tokens.weight",), VocabSplit(),
                 when="tied", export=False),
    # vision tower
    ParamMapping("vision_model.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), REPLICATED),
    ParamMapping(_VIS + "input_layernorm.weight", (_HF_VIS + "norm1.weight",), REPLICATED),
    ParamMapping(_VIS + "self_attention.linear_qkv.layer_norm_weight", (_HF_VIS + "norm1.weight",), REPLICATED),
    ParamMapping(_VIS + "self_attention.linear_qkv.weight", (_HF_VIS + "attn.qkv.weight",), GroupedQKV("vision")),
    ParamMapping(_VIS + "self_attention.linear_qkv.bias", (_HF_VIS + "attn.qkv.bias",), GroupedQKV("vision")),
    ParamMapping(_VIS + "self_attention.linear_proj.weight", (_HF_VIS + "attn.proj.weight",), ROW),
    ParamMapping(_VIS + "self_attention.linear_proj.bias", (_HF_VIS + "attn.proj.bias",), REPLICATED),
    ParamMapping(_VIS + "pre_mlp_layernorm.weight", (_HF_VIS + "norm2.weight",), REPLICATED),
    ParamMapping(_VIS + "mlp.linear_fc1.layer_norm_weight", (_HF_VIS + "norm2.weight",), REPLICATED),
    ParamMapping(_VIS + "mlp.linear_fc1.weight", (_HF_VIS + "mlp.gate_proj.weight", _HF_VIS + "mlp.up_proj.weight"), GatedMLP()),
    ParamMapping(_VIS + "mlp.linear_fc1.bias", (_HF_VIS + "mlp.gate_proj.bias", _HF_VIS + "mlp.up_proj.bias"), GatedMLP()),
    ParamMapping(_VIS + "mlp.linear_fc2.weight", (_HF_VIS + "mlp.down_proj.weight",), ROW),
    ParamMapping(_VIS + "mlp.linear_fc2.bias", (_HF_VIS + "mlp.down_proj.bias",), REPLICATED),
    ParamMapping("vision_model.merger.ln_q.weight", ("visual.merger.ln_q.weight",), REPLICATED),
    ParamMapping("vision_model.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), COLUMN),
    ParamMapping("vision_model.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), COLUMN),
    ParamMapping("vision_model.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), ROW),
    ParamMapping("vision_model.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",), REPLICATED),
)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _index(table) -> dict[tuple[str, bool], ParamMapping]:
    out = {}
    for entry in table:
        tied_options = (True, False) if entry.when is None else ((entry.when == "tied"),)
        for tied in tied_options:
            out[(entry.megatron, tied)] = entry
    return out


_BY_PATTERN = _index(QWEN25_VL_MAPPING)


@dataclass(frozen=True)
class ResolvedParam:
    """One megatron parameter of this rank, with its global layer index and HF names resolved."""

    megatron_name: str  # name inside its model chunk (local layer index)
    global_name: str  # same with the global layer index
    hf_names: tuple[str, ...]
    mapping: ParamMapping


def lookup(global_name: str, tied: bool) -> ResolvedParam:
    match = _LAYER_RE.search(global_name)
    pattern = _LAYER_RE.sub(".layers.*.", global_name, count=1) if match else global_name
    entry = _BY_PATTERN.get((pattern, tied))
    if entry is None:
        raise KeyError(f"no HF mapping for megatron parameter {global_name}")
    layer = match.group(1) if match else None
    hf = tuple(h.replace("*", layer) if layer is not None else h for h in entry.hf)
    return ResolvedParam(global_name, global_name, hf, entry)


_NAMING = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)


def hub_name(name: str) -> str:
    """Hub key naming for an HF tensor name given in either naming."""
    for new, old in _NAMING:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def inmemory_name(name: str) -> str:
    """Newer transformers' in-memory naming (``model.language_model.*``, ``model.visual.*``)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    return name


# --------------------------------------------------------------------------------------------
# Driving the table over model chunks (this rank's shards)


def unwrap(module):
    """The bare model under DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _global_layer_name(model, name: str) -> str:
    """Local pipeline layer index -> global index (``layer_number - 1``) for language layers."""
    prefix = "language_model.decoder.layers."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix):].split(".", 1)
    layer_number = model.language_model.decoder.layers[int(local)].layer_number
    return f"{prefix}{layer_number - 1}.{rest}"


def resolve_params(model_chunks) -> list[tuple[ResolvedParam, torch.nn.Parameter]]:
    """Every parameter of this rank's chunks with its table entry and global HF names."""
    out = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        tied = model.extras.tie_word_embeddings
        for name, param in model.named_parameters():
            resolved = lookup(_global_layer_name(model, name), tied)
            out.append((ResolvedParam(name, resolved.global_name, resolved.hf_names, resolved.mapping), param))
    return out


def _tp_shards(param: torch.Tensor, transform) -> list[torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if isinstance(transform, Replicated) or tp_size == 1:
        return [param.detach()] * (1 if isinstance(transform, Replicated) else tp_size)
    shards = [torch.empty_like(param) for _ in range(tp_size)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def iter_hf_tensors(model_chunks, *, all_stages: bool = True):
    """Yield ``(hub_name, full tensor)`` for the model, gathered over TP (and over PP if ``all_stages``).

    With ``all_stages`` every rank yields every tensor: each pipeline stage broadcasts its own in turn
    (plans are exchanged first, so receivers allocate exactly). Without it, a rank yields only its
    stage's tensors. The tied output layer copy is never yielded (``export=False``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    resolved = [(r, p) for r, p in resolve_params(model_chunks) if r.mapping.export]
    ctx = MappingContext.from_extras(unwrap(model_chunks[0]).extras)

    def materialise(r, p):
        return r.mapping.transform.to_hf(_tp_shards(p, r.mapping.transform), ctx)

    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if not all_stages or pp_size == 1:
        for r, p in resolved:
            yield from zip(r.hf_names, materialise(r, p))
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    # Each stage's plan: per parameter, the HF names, shapes and dtype it expands to (from meta shards).
    plan = []
    for r, p in resolved:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        meta = [torch.empty(p.shape, dtype=p.dtype, device="meta")] * (1 if isinstance(r.mapping.transform, Replicated) else tp_size)
        plan.append([(h, tuple(t.shape), str(p.dtype).removeprefix("torch.")) for h, t in zip(r.hf_names, r.mapping.transform.to_hf(meta, ctx))])
    plans = [None] * pp_size
    dist.all_gather_object(plans, plan, group=group)
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    for stage in range(pp_size):
        src = dist.get_global_rank(group, stage)
        for index, entries in enumerate(plans[stage]):
            if stage == my_stage:
                tensors = [t.contiguous() for t in materialise(*resolved[index])]
            else:
                device = resolved[0][1].device if resolved else torch.device("cpu")
                tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for _, shape, dtype in entries]
            for (hf, _, _), tensor in zip(entries, tensors):
                dist.broadcast(tensor, src=src, group=group)
                yield hf, tensor


def gather_hf_state_dict(model_chunks, *, all_stages: bool = True) -> dict[str, torch.Tensor]:
    """The model as an HF state dict (Hub naming), on every rank when ``all_stages``."""
    return dict(iter_hf_tensors(model_chunks, all_stages=all_stages))
