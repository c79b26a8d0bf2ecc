"""The Qwen-VL model families, as data: what one family's vision tower does differently.

Qwen2-VL and Qwen2.5-VL share the language model (Qwen2 decoder with 3-row mrope), the patch
embedding, the vision attention (fused qkv with bias, 2-D rotary), the merger's shape
(2x2 patches -> Linear -> GELU -> Linear) and therefore the converters, weight sync and trainer.
Everything that differs is one field below (read by ``configs_from_hf``, the vision tower, the layer
specs and ``hf_fields``) or one block of the mapping table (``checkpoint/mapping.py``). A family is
chosen by the checkpoint's ``model_type``, never by a flag.

                         qwen2_5_vl                        qwen2_vl
  vision block norms     RMSNorm (weight)                  LayerNorm (weight, bias)
  vision MLP             gated SiLU: gate/up/down_proj     fc1 -> hidden_act (quick_gelu) -> fc2
  vision attention       windows, full in fullatt blocks   full (per image) in every block
  merger ln_q            RMSNorm                           LayerNorm
  vision config          hidden_size, intermediate_size,   embed_dim, mlp_ratio,
                         out_hidden_size, window_size ...  hidden_size (= merger output)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Norm = Literal["RMSNorm", "LayerNorm"]


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    hf_model_class: str  # transformers' ...ForConditionalGeneration
    hf_config_class: str
    hf_processor_class: str
    vision_norm: Norm  # the two norms of every vision block
    vision_gated_mlp: bool  # gated (gate/up -> act * up -> down) or plain fc1 -> act -> fc2
    vision_windows: bool  # window attention with window re-ordering outside ``fullatt_block_indexes``
    merger_norm: Norm


FAMILIES: dict[str, ModelFamily] = {
    "qwen2_5_vl": ModelFamily(
        model_type="qwen2_5_vl", hf_model_class="Qwen2_5_VLForConditionalGeneration",
        hf_config_class="Qwen2_5_VLConfig", hf_processor_class="Qwen2_5_VLProcessor",
        vision_norm="RMSNorm", vision_gated_mlp=True, vision_windows=True, merger_norm="RMSNorm"),
    "qwen2_vl": ModelFamily(
        model_type="qwen2_vl", hf_model_class="Qwen2VLForConditionalGeneration",
        hf_config_class="Qwen2VLConfig", hf_processor_class="Qwen2VLProcessor",
        vision_norm="LayerNorm", vision_gated_mlp=False, vision_windows=False, merger_norm="LayerNorm"),
}

DEFAULT_MODEL_TYPE = "qwen2_5_vl"  # a config.json without ``model_type`` (older exports) is Qwen2.5-VL


def family(model_type: str) -> ModelFamily:
    """The family of ``model_type``; an unsupported one is refused by name."""
    found = FAMILIES.get(model_type)
    if found is None:
        raise ValueError(f"unsupported model_type={model_type!r}: supported are {', '.join(FAMILIES)}")
    return found


def transformers_class(model_type: str, kind: str = "model"):
    """transformers' model / config / processor class of a family (imports transformers)."""
    import transformers

    fam = family(model_type)
    name = {"model": fam.hf_model_class, "config": fam.hf_config_class, "processor": fam.hf_processor_class}[kind]
    return getattr(transformers, name)
