"""models/qwen2_5_vl/hf_fields.py against transformers' own Qwen2_5_VLConfig, field by field.

Every config below is given both to our reader and to transformers; each field the megatron model
reads must come out the same. The Hub layouts come from test_qwen_config; the others are the
variations transformers handles: nested ``text_config`` (what ``to_dict`` writes), the newer
``rope_parameters``, absent fields (class defaults), ``num_key_value_heads: null``, the vision
``num_attention_heads`` alias, ties at either level, top-level text fields next to a ``text_config``.
"""
import copy
import dataclasses
import functools
import json

import pytest
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from tests.unit.test_qwen_config import HUB
from visurf_megatron.models.qwen2_5_vl.config import configs_from_hf, load_hf_config
from visurf_megatron.models.qwen2_5_vl.hf_fields import (
    TEXT_DEFAULTS,
    TOP_DEFAULTS,
    VISION_DEFAULTS,
    read_qwen_vl_fields,
)


def _qwen2_vision_view(vision) -> dict:
    """transformers' Qwen2VLVisionConfig in Qwen2.5-VL's terms, as its modeling code uses the fields:
    blocks of width ``embed_dim`` with an ``int(embed_dim * mlp_ratio)`` MLP, a merger to
    ``hidden_size``, every block full attention."""
    return {"depth": vision.depth, "hidden_size": vision.embed_dim, "hidden_act": vision.hidden_act,
            "intermediate_size": int(vision.embed_dim * vision.mlp_ratio), "num_heads": vision.num_heads,
            "in_channels": vision.in_channels, "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "temporal_patch_size": vision.temporal_patch_size,
            "tokens_per_second": 0, "window_size": 0, "out_hidden_size": vision.hidden_size,
            "fullatt_block_indexes": tuple(range(vision.depth))}


def _transformers_view(data: dict) -> dict:
    """The same fields, as transformers' config object (of the family of ``model_type``) gives them."""
    config_class = Qwen2VLConfig if data.get("model_type") == "qwen2_vl" else Qwen2_5_VLConfig
    hf = config_class(**{k: v for k, v in copy.deepcopy(data).items() if k not in ("architectures", "transformers_version")})
    text, vision = hf.text_config, hf.vision_config
    rope, vision_rope = dict(text.rope_parameters or {}), dict(vision.rope_parameters or {})
    section = rope.get("mrope_section")
    vision_view = (_qwen2_vision_view(vision) if hf.model_type == "qwen2_vl" else
                   {**{k: getattr(vision, k) for k in VISION_DEFAULTS}, "fullatt_block_indexes": tuple(vision.fullatt_block_indexes)})
    return {
        "text": {**{k: getattr(text, k) for k in TEXT_DEFAULTS}, "rope_theta": float(rope["rope_theta"]),
                 "mrope_section": tuple(section) if section is not None else None},
        "vision": {**vision_view, "rope_theta": float(vision_rope["rope_theta"])},
        "tie_word_embeddings": bool(hf.tie_word_embeddings),
        **{k: getattr(hf, k) for k in TOP_DEFAULTS},
        "model_type": hf.model_type,
    }


def _ours(data: dict) -> dict:
    return dataclasses.asdict(read_qwen_vl_fields(copy.deepcopy(data)))


def _nested(flat: dict) -> dict:
    return load_hf_config(flat).to_dict()


def _variants() -> dict[str, dict]:
    seven = HUB["7B"]
    cases = {f"hub-{size}": cfg for size, cfg in HUB.items()}
    cases.update({f"nested-{size}": _nested(cfg) for size, cfg in HUB.items()})
    new_rope = {k: v for k, v in seven.items() if k not in ("rope_scaling", "rope_theta")}
    new_rope["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0, "mrope_section": [8, 28, 28]}
    cases["rope_parameters"] = new_rope
    scaling_no_theta = {k: v for k, v in seven.items() if k != "rope_theta"}
    cases["rope_scaling-without-theta"] = scaling_no_theta
    theta_in_scaling = copy.deepcopy(seven)
    theta_in_scaling["rope_scaling"]["rope_theta"] = 123456.0  # wins over the top-level rope_theta
    cases["theta-inside-rope_scaling"] = theta_in_scaling
    cases["defaults-only"] = {"model_type": "qwen2_5_vl"}
    cases["text-only-vision-defaults"] = {k: v for k, v in seven.items() if k != "vision_config"}
    null_kv = copy.deepcopy(seven)
    null_kv["num_key_value_heads"] = None
    cases["null-kv-heads"] = null_kv
    no_kv = {k: v for k, v in seven.items() if k != "num_key_value_heads"}
    cases["absent-kv-heads"] = no_kv  # transformers' class default (8), not the head count
    alias = copy.deepcopy(seven)
    alias["vision_config"] = {k: v for k, v in alias["vision_config"].items() if k != "num_heads"}
    alias["vision_config"]["num_attention_heads"] = 8
    cases["vision-num_attention_heads"] = alias
    nested_tied = _nested(HUB["7B"])
    nested_tied["tie_word_embeddings"] = False
    nested_tied["text_config"]["tie_word_embeddings"] = True
    cases["tied-in-text_config"] = nested_tied
    shadowed = _nested(HUB["3B"])
    shadowed.update(hidden_size=4096, num_hidden_layers=3, rope_theta=5.0)  # ignored next to text_config
    cases["top-level-text-fields-beside-text_config"] = shadowed
    vision_rope = copy.deepcopy(seven)
    vision_rope["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 20000.0}
    cases["vision-rope_parameters"] = vision_rope
    cases.update(_qwen2_vl_variants())
    return cases


def qwen2_vl_hub_config(size: str) -> dict:
    """Qwen2-VL-{2B,7B,72B}-Instruct's config.json: Qwen2.5-VL's text layout (model_type qwen2_vl) and
    Qwen2-VL's vision_config (embed_dim, mlp_ratio, hidden_size = the language width)."""
    hidden, layers, heads, kv, intermediate, vocab, tied = {
        "2B": (1536, 28, 12, 2, 8960, 151936, True), "7B": (3584, 28, 28, 4, 18944, 152064, False),
        "72B": (8192, 80, 64, 8, 29568, 152064, False)}[size]
    cfg = copy.deepcopy(HUB["7B"])
    cfg.update(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_size=hidden,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=tied,
               max_position_embeddings=32768)
    cfg["vision_config"] = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                            "hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                            "spatial_patch_size": 14, "temporal_patch_size": 2}
    return cfg


def _qwen2_vl_variants() -> dict[str, dict]:
    cases = {f"qwen2_vl-hub-{size}": qwen2_vl_hub_config(size) for size in ("2B", "7B", "72B")}
    cases["qwen2_vl-nested-7B"] = Qwen2VLConfig(**{k: v for k, v in qwen2_vl_hub_config("7B").items()
                                                   if k not in ("architectures", "transformers_version")}).to_dict()
    cases["qwen2_vl-defaults-only"] = {"model_type": "qwen2_vl"}
    alias = qwen2_vl_hub_config("7B")
    alias["vision_config"] = {k: v for k, v in alias["vision_config"].items() if k != "num_heads"}
    alias["vision_config"].update(num_attention_heads=8, hidden_act="gelu", mlp_ratio=2)
    cases["qwen2_vl-vision-alias-act-ratio"] = alias
    return cases


VARIANTS = _variants()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_field_equals_transformers(name):
    data = VARIANTS[name]
    assert _ours(data) == _transformers_view(data)


def test_reads_directories_files_and_transformers_objects_alike(tmp_path):
    data = HUB["3B"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    want = read_qwen_vl_fields(data)
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path), load_hf_config(data), want):
        assert read_qwen_vl_fields(source) == want


def _comparable(config) -> dict:
    """A TransformerConfig's fields, with its init-method partials (new objects each time) as text."""
    return {k: repr(v) if isinstance(v, functools.partial) else v for k, v in dataclasses.asdict(config).items()}


def test_megatron_configs_are_the_same_from_transformers_object_and_dict():
    for size in ("3B", "72B"):
        ours = configs_from_hf(HUB[size], {"tp": 2})
        theirs = configs_from_hf(load_hf_config(HUB[size]), {"tp": 2})
        assert ours[2] == theirs[2]
        assert [_comparable(c) for c in ours[:2]] == [_comparable(c) for c in theirs[:2]]


@pytest.mark.parametrize("patch, message", [
    ({"hidden_size": "3584"}, r"hidden_size = '3584'"),
    ({"rms_norm_eps": None}, r"rms_norm_eps = None"),
    ({"vision_config": {"fullatt_block_indexes": [7, "x"]}}, r"vision_config.fullatt_block_indexes"),
    ({"text_config": [1, 2]}, r"text_config and vision_config must be objects"),
    ({"rope_scaling": "mrope"}, r"rope parameters must be a dict"),
    ({"model_type": "qwen3_vl"}, r"unsupported model_type='qwen3_vl': supported are qwen2_5_vl, qwen2_vl"),
])
def test_bad_values_are_named(patch, message):
    data = {**copy.deepcopy(HUB["7B"]), **patch}
    with pytest.raises(ValueError, match=message):
        read_qwen_vl_fields(data)


def test_missing_file_and_wrong_type():
    with pytest.raises(FileNotFoundError, match="no Qwen2.5-VL config"):
        read_qwen_vl_fields("/nonexistent/dir")
    with pytest.raises(TypeError, match="cannot read a Qwen2.5-VL config from int"):
        read_qwen_vl_fields(3)
