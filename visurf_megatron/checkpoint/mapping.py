"""The one HF <-> Megatron parameter mapping for Qwen2.5-VL and Qwen2-VL, declared once as a table.

The families share the language model, the vision attention and the merger's MLP; their tables differ
only in the vision norms and MLP (``_QWEN25_VISION`` / ``_QWEN2_VISION`` below), chosen by ``model_type``.

Each entry names a megatron parameter (``*`` = layer index), the HF tensors it is made of (same
``*``), and a transform (``transforms.py``) that serves both directions.

Converters, rollout weight sync and the tests all use this table; nothing else encodes the mapping.
HF names are kept in the Hub naming (``model.layers.*``, ``visual.*``, ``lm_head``); ``hub_name``
also accepts the in-memory naming of newer transformers (``model.language_model.*``, ``model.visual.*``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.families import DEFAULT_MODEL_TYPE, family
from .transforms import COLUMN, REPLICATED, ROW, GatedMLP, GroupedQKV, MappingContext, Replicated, VocabSplit


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

_LANGUAGE: tuple[ParamMapping, ...] = (  # shared by both families
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
)

_VISION_ATTENTION: tuple[ParamMapping, ...] = (  # shared: patch embedding, fused qkv, output projection
    ParamMapping("vision_model.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), REPLICATED),
    ParamMapping(_VIS + "self_attention.linear_qkv.weight", (_HF_VIS + "attn.qkv.weight",), GroupedQKV("vision")),
    ParamMapping(_VIS + "self_attention.linear_qkv.bias", (_HF_VIS + "attn.qkv.bias",), GroupedQKV("vision")),
    ParamMapping(_VIS + "self_attention.linear_proj.weight", (_HF_VIS + "attn.proj.weight",), ROW),
    ParamMapping(_VIS + "self_attention.linear_proj.bias", (_HF_VIS + "attn.proj.bias",), REPLICATED),
)

_MERGER_MLP: tuple[ParamMapping, ...] = (  # shared: the merger's Linear -> GELU -> Linear
    ParamMapping("vision_model.merger.linear_fc1.weight", ("visual.merger.mlp.0.weight",), COLUMN),
    ParamMapping("vision_model.merger.linear_fc1.bias", ("visual.merger.mlp.0.bias",), COLUMN),
    ParamMapping("vision_model.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), ROW),
    ParamMapping("vision_model.merger.linear_fc2.bias", ("visual.merger.mlp.2.bias",), REPLICATED),
)


def _norm(megatron: tuple[str, ...], hf: str, bias: bool) -> tuple[ParamMapping, ...]:
    """A norm's weight (and bias: LayerNorm) under each megatron name it has (local spec: its own
    module; Transformer Engine: fused into the next linear as ``layer_norm_*``)."""
    kinds = ("weight", "bias") if bias else ("weight",)
    return tuple(ParamMapping(m.format(kind), (f"{hf}.{kind}",), REPLICATED) for kind in kinds for m in megatron)


_NORM1 = (_VIS + "input_layernorm.{}", _VIS + "self_attention.linear_qkv.layer_norm_{}")
_NORM2 = (_VIS + "pre_mlp_layernorm.{}", _VIS + "mlp.linear_fc1.layer_norm_{}")
_LN_Q = ("vision_model.merger.ln_q.{}",)

# What the families do differently, side by side (``models/families.py``).
_QWEN25_VISION: tuple[ParamMapping, ...] = (  # RMSNorm (weight only), gated SiLU MLP
    *_norm(_NORM1, _HF_VIS + "norm1", bias=False),
    *_norm(_NORM2, _HF_VIS + "norm2", bias=False),
    ParamMapping(_VIS + "mlp.linear_fc1.weight", (_HF_VIS + "mlp.gate_proj.weight", _HF_VIS + "mlp.up_proj.weight"), GatedMLP()),
    ParamMapping(_VIS + "mlp.linear_fc1.bias", (_HF_VIS + "mlp.gate_proj.bias", _HF_VIS + "mlp.up_proj.bias"), GatedMLP()),
    ParamMapping(_VIS + "mlp.linear_fc2.weight", (_HF_VIS + "mlp.down_proj.weight",), ROW),
    ParamMapping(_VIS + "mlp.linear_fc2.bias", (_HF_VIS + "mlp.down_proj.bias",), REPLICATED),
    *_norm(_LN_Q, "visual.merger.ln_q", bias=False),
)
_QWEN2_VISION: tuple[ParamMapping, ...] = (  # LayerNorm (weight and bias), fc1 -> quick_gelu -> fc2
    *_norm(_NORM1, _HF_VIS + "norm1", bias=True),
    *_norm(_NORM2, _HF_VIS + "norm2", bias=True),
    ParamMapping(_VIS + "mlp.linear_fc1.weight", (_HF_VIS + "mlp.fc1.weight",), COLUMN),
    ParamMapping(_VIS + "mlp.linear_fc1.bias", (_HF_VIS + "mlp.fc1.bias",), COLUMN),
    ParamMapping(_VIS + "mlp.linear_fc2.weight", (_HF_VIS + "mlp.fc2.weight",), ROW),
    ParamMapping(_VIS + "mlp.linear_fc2.bias", (_HF_VIS + "mlp.fc2.bias",), REPLICATED),
    *_norm(_LN_Q, "visual.merger.ln_q", bias=True),
)

MAPPINGS: dict[str, tuple[ParamMapping, ...]] = {
    "qwen2_5_vl": _LANGUAGE + _VISION_ATTENTION + _QWEN25_VISION + _MERGER_MLP,
    "qwen2_vl": _LANGUAGE + _VISION_ATTENTION + _QWEN2_VISION + _MERGER_MLP,
}
QWEN25_VL_MAPPING = MAPPINGS["qwen2_5_vl"]
QWEN2_VL_MAPPING = MAPPINGS["qwen2_vl"]

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _index(table) -> dict[tuple[str, bool], ParamMapping]:
    out = {}
    for entry in table:
        tied_options = (True, False) if entry.when is None else ((entry.when == "tied"),)
        for tied in tied_options:
            out[(entry.megatron, tied)] = entry
    return out


_BY_PATTERN = {model_type: _index(table) for model_type, table in MAPPINGS.items()}


@dataclass(frozen=True)
class ResolvedParam:
    """One megatron parameter of this rank, with its global layer index and HF names resolved."""

    megatron_name: str  # name inside its model chunk (local layer index)
    global_name: str  # same with the global layer index
    hf_names: tuple[str, ...]
    mapping: ParamMapping


def lookup(global_name: str, tied: bool, model_type: str = DEFAULT_MODEL_TYPE) -> ResolvedParam:
    match = _LAYER_RE.search(global_name)
    pattern = _LAYER_RE.sub(".layers.*.", global_name, count=1) if match else global_name
    entry = _BY_PATTERN[family(model_type).model_type].get((pattern, tied))
    if entry is None:
        raise KeyError(f"no HF mapping for megatron parameter {global_name} ({model_type})")
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
        tied, model_type = model.extras.tie_word_embeddings, model.extras.model_type
        for name, param in model.named_parameters():
            resolved = lookup(_global_layer_name(model, name), tied, model_type)
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
