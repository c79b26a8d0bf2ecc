"""HF Qwen2.5-VL config -> megatron-core TransformerConfigs for the language model and vision tower.

Works for any Qwen2.5-VL config.json (3B tied, 7B/32B/72B untied), in the Hub's flat layout or the
nested ``text_config`` layout newer transformers writes: both are read by ``hf_fields`` with
transformers' semantics, without importing transformers (~1 s per process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from ..families import DEFAULT_MODEL_TYPE, FAMILIES, ModelFamily, family, transformers_class
from .hf_fields import hf_config_dict, read_qwen_vl_fields

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``quick_gelu`` (Qwen2-VL's vision MLP): x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "quick_gelu": quick_gelu}


class LayoutError(ValueError):
    """A parallel layout that cannot hold this model."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Qwen25VLExtras:
    """Everything outside the two TransformerConfigs that the model, mapping and data code need."""

    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    # vision tower
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    vision_hidden_size: int
    out_hidden_size: int
    vision_rope_theta: float = 10000.0
    tokens_per_second: int = 2
    # language attention geometry (for the QKV mapping)
    num_attention_heads: int = 0
    num_query_groups: int = 0
    head_dim: int = 0
    vision_num_heads: int = 0
    extra: dict = field(default_factory=dict)
    model_type: str = DEFAULT_MODEL_TYPE  # the family (``models/families.py``)

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    @property
    def family(self) -> ModelFamily:
        return family(self.model_type)


def load_hf_config(source: Any):
    """A transformers ``Qwen2_5_VLConfig`` / ``Qwen2VLConfig`` (by ``model_type``) from a config object,
    a dict, a directory or a config.json (for code that needs transformers' object; the model itself
    reads ``hf_fields``)."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig) and getattr(source, "model_type", None) in FAMILIES:
        return source
    data = hf_config_dict(source)
    config_class = transformers_class(data.get("model_type", DEFAULT_MODEL_TYPE), "config")
    return config_class(**{k: v for k, v in data.items() if k not in ("architectures", "transformers_version")})


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's convention: the embedding rows are a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def validate_layout(heads: int, groups: int, vision_heads: int, num_layers: int, layout: ParallelLayout) -> None:
    tp, pp = layout.tp, layout.pp
    if tp < 1 or pp < 1:
        raise LayoutError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    if heads % tp:
        raise LayoutError(f"tp={tp} does not divide the {heads} attention heads of the language model")
    if groups % tp:
        raise LayoutError(f"tp={tp} does not divide the {groups} query groups (KV heads) of the language model")
    if vision_heads % tp:
        raise LayoutError(f"tp={tp} does not divide the {vision_heads} attention heads of the vision tower")
    if num_layers % pp:
        raise LayoutError(f"pp={pp} does not divide the {num_layers} language layers")
    if layout.vpp is not None and (num_layers % (pp * layout.vpp) or pp < 2):
        raise LayoutError(f"vpp={layout.vpp} with pp={pp} does not split {num_layers} layers evenly")
    if layout.sequence_parallel and tp == 1:
        raise LayoutError("sequence parallel needs tp > 1")


# FP8 settings that count language layers (kept BF16 at the start / end of the decoder).
_LANGUAGE_ONLY_FIELDS = ("first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


def vision_fp8_shape_problems(hidden: int, ffn: int, gated: bool, tp: int) -> list[str]:
    """The vision layers' local GEMM weights that break Transformer Engine's FP8 shape rule.

    TE checks every FP8 GEMM's weight [out/tp or out, in or in/tp] like its input (``specs.
    fp8_gemm_shape_ok``). Qwen2.5-VL's vision MLP is 3420 wide, not a multiple of 16, so its fc2
    can never run in FP8: ``fp8_vision`` is refused for it rather than failing in the first step.
    """
    from .specs import fp8_gemm_shape_ok

    weights = {"linear_qkv": (3 * hidden // tp, hidden), "linear_proj": (hidden, hidden // tp),
               "linear_fc1": ((2 if gated else 1) * ffn // tp, hidden), "linear_fc2": (hidden, ffn // tp)}
    return [f"{name} {list(shape)}" for name, shape in weights.items() if not fp8_gemm_shape_ok(shape)]


def _vision_overrides(overrides: Mapping[str, Any], fp8_vision: bool) -> dict[str, Any]:
    """The overrides that apply to the vision tower: FP8 ones only when asked for."""
    return {
        k: v for k, v in overrides.items()
        if k not in _LANGUAGE_ONLY_FIELDS and (fp8_vision or not k.startswith("fp8"))
    }


def configs_from_hf(
    hf_config: Any,
    parallel: ParallelLayout | Mapping[str, Any] | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    vocab_divisible_by: int = 128,
    fp8_vision: bool = False,
    **overrides: Any,
) -> tuple[TransformerConfig, TransformerConfig, Qwen25VLExtras]:
    """(language TransformerConfig, vision TransformerConfig, extras) for a Qwen2.5-VL config.

    ``overrides`` are applied to both TransformerConfigs (e.g. ``recompute_granularity``; they may
    replace the common fields too, e.g. ``use_cpu_initialization=True`` to build on the CPU with a
    GPU present), except FP8
    fields (``specs.fp8_overrides``): those reach the vision tower only with ``fp8_vision=True``, and
    the BF16 first/last-layer counts, which count language layers, never do.
    """
    hf = read_qwen_vl_fields(hf_config)
    text, vision = hf.text, hf.vision
    if parallel is None:
        parallel = ParallelLayout()
    elif isinstance(parallel, Mapping):
        parallel = ParallelLayout(**parallel)
    heads = text.num_attention_heads
    groups = text.num_key_value_heads
    head_dim = text.hidden_size // heads
    validate_layout(heads, groups, vision.num_heads, text.num_hidden_layers, parallel)
    mrope_section = text.mrope_section or (16, 24, 24)
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    tied = hf.tie_word_embeddings
    fam = family(hf.model_type)
    if fp8_vision and overrides.get("fp8"):
        bad = vision_fp8_shape_problems(vision.hidden_size, vision.intermediate_size, fam.vision_gated_mlp, parallel.tp)
        if bad:
            raise LayoutError(
                f"fp8_vision: the vision tower's local GEMM weights {', '.join(bad)} (tp={parallel.tp}) break "
                "Transformer Engine's FP8 rule (rows % 8, last dim % 16); keep the vision tower in BF16 "
                "(model.fp8_vision=false)")
    # Megatron needs the same pipeline dtype on every rank; the vision tower lives on stage 0 only.
    common = dict(
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp,
        # On CPU megatron must build on the CPU. With CUDA it builds each rank's shard on its GPU;
        # CPU initialisation there would make Transformer Engine layers build full, unsharded
        # fp32 master weights in host memory first (hundreds of GB for 72B).
        use_cpu_initialization=not torch.cuda.is_available(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        batch_p2p_sync=False,
    )
    language = TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        layernorm_epsilon=text.rms_norm_eps,
        activation_func=_ACTIVATIONS[text.hidden_act],
        add_bias_linear=False,
        add_qkv_bias=True,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        mrope_section=list(mrope_section),
        **{**common, **overrides},
    )
    vision_cfg = TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.hidden_size // vision.num_heads,
        layernorm_epsilon=1e-6,  # fixed in HF's vision blocks, not read from the config
        activation_func=_ACTIVATIONS[vision.hidden_act],
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        # The family's block: Qwen2-VL has LayerNorm and a plain fc1 -> act -> fc2 MLP.
        **{**common, "normalization": fam.vision_norm, "gated_linear_unit": fam.vision_gated_mlp,
           **_vision_overrides(overrides, fp8_vision)},
    )
    extras = Qwen25VLExtras(
        vocab_size=text.vocab_size,
        padded_vocab_size=pad_vocab_size(text.vocab_size, parallel.tp, vocab_divisible_by),
        tie_word_embeddings=tied,
        rope_theta=text.rope_theta,
        mrope_section=mrope_section,
        max_position_embeddings=text.max_position_embeddings,
        image_token_id=hf.image_token_id,
        video_token_id=hf.video_token_id,
        vision_start_token_id=hf.vision_start_token_id,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        in_channels=vision.in_channels,
        spatial_merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        fullatt_block_indexes=vision.fullatt_block_indexes,
        vision_hidden_size=vision.hidden_size,
        out_hidden_size=vision.out_hidden_size,
        vision_rope_theta=vision.rope_theta,
        tokens_per_second=vision.tokens_per_second,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vision_num_heads=vision.num_heads,
        model_type=hf.model_type,
    )
    if extras.out_hidden_size != text.hidden_size:
        raise ValueError(f"vision out_hidden_size {extras.out_hidden_size} != language hidden {text.hidden_size}")
    return language, vision_cfg, extras
