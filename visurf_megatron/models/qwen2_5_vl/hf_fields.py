"""The fields of a Qwen2.5-VL ``config.json`` that the megatron model needs, read without transformers.

transformers' ``Qwen2_5_VLConfig`` pulls in ~1,400 modules (dynamo among them): about 1 s in every
process that imports it, i.e. in every converter rank, for some 30 numbers. This module reads them
with the semantics of transformers 5.20's config classes:

* the Hub's flat layout (text fields at the top level) and the nested ``text_config`` layout; with
  ``text_config`` present, top-level text fields are ignored, as transformers does;
* ``rope_scaling`` (old name) wins over ``rope_parameters``; ``rope_theta`` fills in when the rope
  dict has none; ``num_key_value_heads: null`` means one group per head;
* the vision tower's ``num_attention_heads`` is an alias of ``num_heads``; unknown keys (the Hub's
  ``in_chans``, ``spatial_patch_size``) are ignored;
* every absent field takes transformers' class default; tied embeddings if either level says so.
* a Qwen2-VL config (``model_type: qwen2_vl``) has the same text and top-level fields; its vision
  fields (``embed_dim``, ``mlp_ratio``, merger ``hidden_size``) come out in Qwen2.5-VL's terms;
  any other ``model_type`` is refused by name (``models/families.py``).

``tests/unit/test_hf_fields.py`` holds every field to transformers' own config object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..families import DEFAULT_MODEL_TYPE, family

# transformers 5.20: Qwen2_5_VLTextConfig / Qwen2_5_VLVisionConfig / Qwen2_5_VLConfig class defaults.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
}
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "tokens_per_second": 4, "window_size": 112, "out_hidden_size": 3584, "fullatt_block_indexes": (7, 15, 23, 31),
}
# transformers 5.19: Qwen2VLVisionConfig class defaults (Qwen2-VL; its text and top-level fields and
# defaults are Qwen2.5-VL's). ``embed_dim`` is the tower's width, ``hidden_size`` the merger's output.
QWEN2_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
    "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
}
TOP_DEFAULTS: dict[str, Any] = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652}
TEXT_ROPE_THETA = 1_000_000.0
VISION_ROPE_THETA = 10_000.0
_ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")
_FLOATS = {"rms_norm_eps", "mlp_ratio"}
_STRINGS = {"hidden_act"}


@dataclass(frozen=True)
class TextFields:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: Optional[tuple[int, ...]]


@dataclass(frozen=True)
class VisionFields:
    depth: int
    hidden_size: int
    hidden_act: str
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    tokens_per_second: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float


@dataclass(frozen=True)
class QwenVLFields:
    text: TextFields
    vision: VisionFields
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    model_type: str = DEFAULT_MODEL_TYPE


def _typed(where: str, key: str, value: Any) -> Any:
    """``value`` checked against the field's kind; the error names the field."""
    if key in _STRINGS:
        ok = isinstance(value, str)
    elif key in _FLOATS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif key == "fullatt_block_indexes":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"config.json: {where}{key} = {value!r} is not a valid value")
    return value


def _fields(source: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {k: _typed(where, k, source[k] if k in source else d) for k, d in defaults.items()}


def _rope(source: Mapping[str, Any], default_theta: float) -> tuple[float, Optional[tuple[int, ...]]]:
    rope = source.get("rope_scaling") or source.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"config.json: rope parameters must be a dict, got {rope!r}")
    theta = rope.get("rope_theta", source.get("rope_theta", default_theta))
    section = rope.get("mrope_section")
    return float(theta), (tuple(int(s) for s in section) if section is not None else None)


def hf_config_dict(source: Any) -> dict[str, Any]:
    """The config as a dict (from a dict, a directory, a config.json path or a transformers config)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no Qwen2.5-VL config at {path}")
        source = json.loads(path.read_text())
    elif not isinstance(source, Mapping) and callable(getattr(source, "to_dict", None)):
        source = source.to_dict()  # a transformers config object
    if not isinstance(source, Mapping):
        raise TypeError(f"cannot read a Qwen2.5-VL config from {type(source).__name__}")
    family(source.get("model_type", DEFAULT_MODEL_TYPE))  # refuses an unsupported model_type by name
    return dict(source)


def _qwen2_vision(vision: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2-VL's vision fields in Qwen2.5-VL's terms: width ``embed_dim``, MLP ``embed_dim * mlp_ratio``
    (transformers' ``int(...)``), merger output ``hidden_size``, full attention in every block."""
    raw = _fields(vision, QWEN2_VISION_DEFAULTS, "vision_config.")
    return dict(
        depth=raw["depth"], hidden_size=raw["embed_dim"], hidden_act=raw["hidden_act"],
        intermediate_size=int(raw["embed_dim"] * raw["mlp_ratio"]), num_heads=raw["num_heads"],
        in_channels=raw["in_channels"], patch_size=raw["patch_size"], spatial_merge_size=raw["spatial_merge_size"],
        temporal_patch_size=raw["temporal_patch_size"],
        tokens_per_second=0,  # Qwen2-VL's video rope has no time scaling (the model reads no videos)
        window_size=0,  # no windows ...
        out_hidden_size=raw["hidden_size"], fullatt_block_indexes=tuple(range(raw["depth"])),  # ... full everywhere
    )


def read_qwen_vl_fields(source: Any) -> QwenVLFields:
    """The fields of a config dict, a directory, a config.json path or a transformers config object."""
    if isinstance(source, QwenVLFields):
        return source
    data = hf_config_dict(source)
    text_src = data.get("text_config")
    if text_src is None:  # flat layout: the text fields live at the top level
        text_src = {k: data[k] for k in (*TEXT_DEFAULTS, *_ROPE_KEYS) if k in data}
    vision_src = data.get("vision_config") or {}
    if not isinstance(text_src, Mapping) or not isinstance(vision_src, Mapping):
        raise ValueError("config.json: text_config and vision_config must be objects")
    text = dict(text_src)
    if "num_key_value_heads" in text and text["num_key_value_heads"] is None:  # absent: the default
        text["num_key_value_heads"] = text.get("num_attention_heads", TEXT_DEFAULTS["num_attention_heads"])
    vision = dict(vision_src)
    if "num_heads" not in vision and "num_attention_heads" in vision:
        vision["num_heads"] = vision["num_attention_heads"]
    text_theta, mrope_section = _rope(text, TEXT_ROPE_THETA)
    vision_theta, _ = _rope(vision, VISION_ROPE_THETA)
    model_type = data.get("model_type", DEFAULT_MODEL_TYPE)
    vision_fields = (_qwen2_vision(vision) if model_type == "qwen2_vl"
                     else _fields(vision, VISION_DEFAULTS, "vision_config."))
    return QwenVLFields(
        text=TextFields(**_fields(text, TEXT_DEFAULTS, "text_config."), rope_theta=text_theta,
                        mrope_section=mrope_section),
        vision=VisionFields(**vision_fields, rope_theta=vision_theta),
        tie_word_embeddings=bool(data.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        **_fields(data, TOP_DEFAULTS, ""),
        model_type=model_type,
    )
