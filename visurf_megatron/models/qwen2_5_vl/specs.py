"""Layer specs for both towers: local (pure PyTorch, CPU) and Transformer Engine (GPU), plus FP8.

The language tower is causal; the vision tower is bidirectional inside windows / whole images. On CPU
those regions are an explicit boolean mask (``AttnMaskType.arbitrary``); with Transformer Engine they
are packed sequences (THD, ``cu_seqlens``), which TE runs as varlen attention without an N^2 mask.
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Any, Literal

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..local_spec import local_layer_spec

Backend = Literal["local", "te"]

# Transformer Engine's FP8 GEMMs (TE 2.11 ``pytorch/utils.py`` ``assert_dim_for_fp8_exec``, called
# on each linear's local input and weight before any sequence-parallel all-gather): the product of
# all dims but the last divisible by 8, the last divisible by 16.
FP8_ROWS_MULTIPLE = 8
FP8_COLS_MULTIPLE = 16


def fp8_gemm_shape_ok(shape) -> bool:
    """TE's FP8 shape rule for one GEMM operand (an input [..., K] or a weight [N, K])."""
    rows = 1
    for dim in shape[:-1]:
        rows *= int(dim)
    return rows % FP8_ROWS_MULTIPLE == 0 and int(shape[-1]) % FP8_COLS_MULTIPLE == 0


def transformer_engine_available() -> bool:
    # Importing TE without CUDA raises RuntimeError (not ImportError), so probe the spec first.
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means TE is unusable here
        return False
    return True


def select_backend(spec: str = "auto") -> Backend:
    """``auto``: Transformer Engine when CUDA and TE are usable, else local."""
    if spec == "local":
        return "local"
    if spec == "te":
        if not transformer_engine_available():
            raise RuntimeError("model.spec=te needs CUDA and transformer-engine (install the `gpu` extra)")
        return "te"
    if spec != "auto":
        raise ValueError(f"unknown layer spec {spec!r}; choose auto, local or te")
    return "te" if transformer_engine_available() else "local"


def _vision_attention(spec: ModuleSpec, mask_type: AttnMaskType) -> ModuleSpec:
    from .vision import PerTokenRotarySelfAttention

    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.module = PerTokenRotarySelfAttention
    attn.params = dict(attn.params or {}, attn_mask_type=mask_type)
    return spec


def language_layer_spec(backend: Backend) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from .packing import SegmentedDotProductAttention

    spec = local_layer_spec()  # a copy: safe to change
    # Packed micro-batches reach attention as THD streams; this core attends per row (packing.py).
    spec.submodules.self_attention.submodules.core_attention = SegmentedDotProductAttention
    return spec


def vision_layer_spec(backend: Backend, norm: str = "RMSNorm") -> ModuleSpec:
    """The vision block; ``norm`` is the family's (``ModelFamily.vision_norm``). Transformer Engine
    fuses the norm into its linears and reads its kind from ``config.normalization`` instead."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # "padding" + packed THD sequences = bidirectional varlen attention per window / image.
        return _vision_attention(get_gpt_layer_with_transformer_engine_spec(), AttnMaskType.padding)
    return _vision_attention(local_layer_spec(norm), AttnMaskType.arbitrary)


# Lowest compute capability per FP8 recipe (Transformer Engine 2.11 ``pytorch/quantization.py``:
# check_fp8_support 8.9, check_fp8_block_scaling_support 9.0, check_mxfp8_support 10.0).
FP8_RECIPE_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def check_fp8_recipe_supported(recipe: str, capability: tuple[int, int]) -> None:
    """Refuse an FP8 recipe the GPU cannot run, before any weight is built (TE would fail later,
    inside the first forward, with a message that does not name the setting)."""
    if recipe not in FP8_RECIPE_MIN_CAPABILITY:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose one of {sorted(FP8_RECIPE_MIN_CAPABILITY)}")
    need = FP8_RECIPE_MIN_CAPABILITY[recipe]
    if tuple(capability) < need:
        have = ".".join(map(str, capability))
        hint = " (Hopper is 9.0: use tensorwise or blockwise)" if recipe == "mxfp8" else ""
        raise ValueError(f"model.fp8_recipe={recipe} needs GPU compute capability >= {need[0]}.{need[1]}, "
                         f"this GPU has {have}{hint}")


def fp8_overrides(fp8: str | None, recipe: str = "tensorwise", bf16_first_last_layers: int = 1) -> dict[str, Any]:
    """TransformerConfig fields for FP8 in the language tower (empty when FP8 is off).

    The vision tower stays BF16 by default: TE's FP8 GEMMs need dimensions divisible by 16 and the
    vision token count of an image batch rarely is. On a GPU the recipe is checked against its
    compute capability (``check_fp8_recipe_supported``).
    """
    if not fp8:
        return {}
    if fp8 not in ("hybrid", "e4m3"):
        raise ValueError(f"fp8 must be hybrid or e4m3, got {fp8!r}")
    if torch.cuda.is_available():
        check_fp8_recipe_supported(recipe, torch.cuda.get_device_capability())
    out: dict[str, Any] = {"fp8": fp8, "fp8_recipe": recipe}
    if bf16_first_last_layers > 0:
        if recipe == "delayed":
            raise ValueError("delayed FP8 scaling cannot keep first/last layers in BF16")
        out.update(
            first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=bf16_first_last_layers,
            num_layers_at_end_in_bf16=bf16_first_last_layers,
        )
    return out
