"""models/qwen2_5_vl/config.py: Hub config.json layouts -> megatron TransformerConfigs, extras, layout errors.

The config dicts below are written out like the Hub's Qwen2.5-VL-{3B,7B,32B,72B}-Instruct config.json
files: flat text parameters, ``rope_scaling: {"type": "mrope", ...}`` and ``rope_theta`` at the top
level, a nested ``vision_config`` (the same tower for every size).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from visurf_megatron.models.qwen2_5_vl.config import (
    LayoutError,
    ParallelLayout,
    configs_from_hf,
    load_hf_config,
    pad_vocab_size,
)


def hub_config(hidden, layers, heads, kv_heads, intermediate, vocab, tied):
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


HUB = {
    "3B": hub_config(2048, 36, 16, 2, 11008, 151936, True),
    "7B": hub_config(3584, 28, 28, 4, 18944, 152064, False),
    "32B": hub_config(5120, 64, 40, 8, 27648, 152064, False),
    "72B": hub_config(8192, 80, 64, 8, 29568, 152064, False),
}

# name: (layers, hidden, heads, groups, ffn, vocab, tied, a valid layout, padded vocab under it)
EXPECTED = {
    "3B": (36, 2048, 16, 2, 11008, 151936, True, ParallelLayout(tp=2, pp=2, sequence_parallel=True), 152064),
    "7B": (28, 3584, 28, 4, 18944, 152064, False, ParallelLayout(tp=4, pp=2, sequence_parallel=True), 152064),
    "32B": (64, 5120, 40, 8, 27648, 152064, False, ParallelLayout(tp=8, pp=4, sequence_parallel=True), 152576),
    "72B": (80, 8192, 64, 8, 29568, 152064, False, ParallelLayout(tp=8, pp=8, sequence_parallel=True), 152576),
}


@pytest.mark.parametrize("name", list(HUB))
def test_hub_configs_to_transformer_configs(name):
    layers, hidden, heads, groups, ffn, vocab, tied, layout, padded = EXPECTED[name]
    lang, vis, ex = configs_from_hf(copy.deepcopy(HUB[name]), layout)
    # language model
    assert (lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups) == (layers, hidden, heads, groups)
    assert lang.kv_channels == 128 and lang.ffn_hidden_size == ffn
    assert lang.add_qkv_bias is True and lang.add_bias_linear is False
    assert lang.gated_linear_unit is True and lang.activation_func is F.silu
    assert lang.normalization == "RMSNorm" and lang.layernorm_epsilon == 1e-6
    assert list(lang.mrope_section) == [16, 24, 24]
    assert lang.tensor_model_parallel_size == layout.tp and lang.pipeline_model_parallel_size == layout.pp
    assert lang.sequence_parallel is True
    assert lang.hidden_dropout == 0.0 and lang.attention_dropout == 0.0
    assert lang.use_cpu_initialization is True and lang.batch_p2p_sync is False
    assert lang.params_dtype == torch.float32 and lang.pipeline_dtype == torch.float32 and not lang.bf16
    # vision tower: same for every size; TP like the LM, never pipelined or sequence parallel
    assert (vis.num_layers, vis.hidden_size, vis.num_attention_heads, vis.num_query_groups) == (32, 1280, 16, 16)
    assert vis.kv_channels == 80 and vis.ffn_hidden_size == 3420
    assert vis.add_qkv_bias is True and vis.add_bias_linear is True and vis.gated_linear_unit is True
    assert vis.activation_func is F.silu and vis.layernorm_epsilon == 1e-6
    assert vis.tensor_model_parallel_size == layout.tp and vis.pipeline_model_parallel_size == 1
    assert vis.sequence_parallel is False
    # extras
    assert ex.tie_word_embeddings is tied
    assert ex.vocab_size == vocab and ex.padded_vocab_size == padded
    assert ex.padded_vocab_size % (128 * layout.tp) == 0
    assert ex.fullatt_block_indexes == (7, 15, 23, 31) and ex.window_size == 112
    assert ex.out_hidden_size == hidden and ex.vision_hidden_size == 1280
    assert (ex.patch_size, ex.temporal_patch_size, ex.spatial_merge_size, ex.in_channels) == (14, 2, 2, 3)
    assert (ex.image_token_id, ex.video_token_id, ex.vision_start_token_id) == (151655, 151656, 151652)
    assert ex.rope_theta == 1e6 and ex.mrope_section == (16, 24, 24) and ex.max_position_embeddings == 128000
    assert (ex.num_attention_heads, ex.num_query_groups, ex.head_dim) == (heads, groups, 128)
    assert (ex.vision_num_heads, ex.vision_head_dim) == (16, 80)


def test_padded_vocab_sizes():
    assert pad_vocab_size(152064, 8) == 152576  # 152064 = 148.5 * 1024
    assert pad_vocab_size(152064, 1) == 152064 and pad_vocab_size(152064, 4) == 152064
    assert pad_vocab_size(151936, 1) == 151936 and pad_vocab_size(151936, 2) == 152064
    assert pad_vocab_size(500, 2) == 512 and pad_vocab_size(500, 1, divisible_by=1) == 500


def test_defaults_bf16_and_mapping_layout():
    lang, vis, ex = configs_from_hf(HUB["7B"], {"tp": 2}, params_dtype=torch.bfloat16)
    assert lang.bf16 and vis.bf16 and lang.params_dtype == torch.bfloat16 and vis.pipeline_dtype == torch.bfloat16
    assert lang.pipeline_model_parallel_size == 1 and lang.sequence_parallel is False
    lang, _, ex = configs_from_hf(HUB["7B"])  # default layout: one rank
    assert lang.tensor_model_parallel_size == 1 and ex.padded_vocab_size == 152064


def test_non_default_rope_values_are_read_from_the_flat_layout():
    cfg = copy.deepcopy(HUB["7B"])
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 28, 28]}
    cfg["rope_theta"] = 500000.0
    lang, _, ex = configs_from_hf(cfg)
    assert list(lang.mrope_section) == [8, 28, 28] and ex.mrope_section == (8, 28, 28)
    assert ex.rope_theta == 500000.0


def test_nested_layout_equals_flat_layout(tmp_path):
    flat = HUB["3B"]
    text_keys = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                 "rms_norm_eps", "vocab_size", "hidden_act", "max_position_embeddings"]
    nested = {k: v for k, v in flat.items() if k not in text_keys + ["rope_scaling", "rope_theta"]}
    nested["text_config"] = {k: flat[k] for k in text_keys}
    nested["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    a = configs_from_hf(flat, ParallelLayout(tp=2))
    for source in (tmp_path, tmp_path / "config.json", nested, load_hf_config(nested)):
        b = configs_from_hf(source, ParallelLayout(tp=2))
        assert b[2] == a[2]
        for x, y in zip(a[:2], b[:2]):
            assert (x.num_layers, x.hidden_size, x.num_query_groups, x.ffn_hidden_size, x.mrope_section) == (
                y.num_layers, y.hidden_size, y.num_query_groups, y.ffn_hidden_size, y.mrope_section)


# --------------------------------------------------------------------------------------------
# Errors


def test_7b_at_tp8_names_the_attention_heads():
    with pytest.raises(LayoutError, match=r"tp=8 does not divide the 28 attention heads"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=8))


def test_query_groups_must_divide_by_tp():
    with pytest.raises(LayoutError, match=r"tp=4 does not divide the 2 query groups"):
        configs_from_hf(HUB["3B"], ParallelLayout(tp=4))  # 16 heads fine, 2 KV heads not
    with pytest.raises(LayoutError, match=r"tp=7 does not divide the 4 query groups"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=7))  # 28 heads fine, 4 KV heads not


def test_vision_heads_must_divide_by_tp():
    cfg = copy.deepcopy(HUB["72B"])
    cfg["num_key_value_heads"] = 64
    with pytest.raises(LayoutError, match=r"16 attention heads of the vision tower"):
        configs_from_hf(cfg, ParallelLayout(tp=32))


def test_pipeline_must_divide_layers():
    with pytest.raises(LayoutError, match=r"pp=3 does not divide the 28 language layers"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=1, pp=3))
    with pytest.raises(LayoutError, match=r"vpp=3"):
        configs_from_hf(HUB["7B"], ParallelLayout(pp=2, vpp=3))
    lang, _, _ = configs_from_hf(HUB["7B"], ParallelLayout(pp=2, vpp=2))
    assert lang.virtual_pipeline_model_parallel_size == 2


def test_sequence_parallel_needs_tp():
    with pytest.raises(LayoutError, match="sequence parallel needs tp > 1"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=1, sequence_parallel=True))
    with pytest.raises(LayoutError, match="must be >= 1"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=0))


def test_mrope_section_must_cover_half_the_head_dim():
    cfg = copy.deepcopy(HUB["7B"])
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 16]}
    with pytest.raises(ValueError, match=r"must sum to head_dim/2 = 64"):
        configs_from_hf(cfg)


def test_wrong_model_type_and_missing_file(tmp_path):
    cfg = copy.deepcopy(HUB["7B"])
    cfg["model_type"] = "llava"  # qwen2_vl is a supported family now (test_qwen2_vl_family.py)
    with pytest.raises(ValueError, match=r"unsupported model_type='llava': supported are qwen2_5_vl, qwen2_vl"):
        configs_from_hf(cfg)
    with pytest.raises(FileNotFoundError, match="no Qwen2.5-VL config"):
        configs_from_hf(tmp_path)
    with pytest.raises(TypeError):
        configs_from_hf(42)


def test_merger_output_must_match_language_hidden():
    cfg = copy.deepcopy(HUB["7B"])
    cfg["vision_config"]["out_hidden_size"] = 2048
    with pytest.raises(ValueError, match=r"out_hidden_size 2048 != language hidden 3584"):
        configs_from_hf(cfg)


def test_qwen2_vl_family_is_read_from_model_type():
    """Qwen2-VL-7B (issue 22): the same language model, the family's vision block (LayerNorm, plain
    quick_gelu MLP of embed_dim * mlp_ratio, no windows), chosen by model_type with no flag."""
    from tests.unit.test_hf_fields import qwen2_vl_hub_config
    from visurf_megatron.models.qwen2_5_vl.config import quick_gelu
    from visurf_megatron.models.qwen2_5_vl.specs import fp8_overrides
    from visurf_megatron.models.qwen2_5_vl.vision import build_vision_layout

    lang25, vis25, ex25 = configs_from_hf(HUB["7B"], ParallelLayout(tp=2))
    lang, vis, extras = configs_from_hf(qwen2_vl_hub_config("7B"), ParallelLayout(tp=2))
    assert extras.model_type == "qwen2_vl" and ex25.model_type == "qwen2_5_vl"
    assert (lang.hidden_size, lang.num_layers, lang.num_query_groups, lang.ffn_hidden_size) == (
        lang25.hidden_size, lang25.num_layers, lang25.num_query_groups, lang25.ffn_hidden_size)
    assert (vis.normalization, vis.gated_linear_unit, vis.activation_func) == ("LayerNorm", False, quick_gelu)
    assert (vis25.normalization, vis25.gated_linear_unit, vis25.activation_func) == ("RMSNorm", True, F.silu)
    assert (vis.hidden_size, vis.ffn_hidden_size, vis.num_layers, extras.out_hidden_size) == (1280, 5120, 32, 3584)
    assert extras.fullatt_block_indexes == tuple(range(32))
    # No windows: the processor's patch order throughout, one attention region per image.
    layout = build_vision_layout(torch.tensor([[1, 6, 10], [1, 4, 4]]), extras)
    assert layout.window_index.tolist() == list(range(19))
    assert layout.cu_window_seqlens.tolist() == layout.cu_image_seqlens.tolist() == [0, 60, 76]
    # Its plain 5120-wide MLP fits TE's FP8 shape rule, where Qwen2.5-VL's 3420-wide gated one does not.
    _, vis, _ = configs_from_hf(qwen2_vl_hub_config("7B"), ParallelLayout(tp=2), params_dtype=torch.bfloat16,
                                fp8_vision=True, **fp8_overrides("e4m3", "tensorwise", 0))
    assert vis.fp8 == "e4m3"
    with pytest.raises(LayoutError, match="fp8_vision"):
        configs_from_hf(HUB["7B"], ParallelLayout(tp=2), params_dtype=torch.bfloat16, fp8_vision=True,
                        **fp8_overrides("e4m3", "tensorwise", 0))
