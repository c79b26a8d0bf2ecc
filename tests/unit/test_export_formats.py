"""Pure parts of the quantised export: format table, refusals, exclusion patterns in the saved naming."""
import pytest

from visurf_megatron.serving.quantize import FORMATS, fix_exclude_modules, resolve_format, saved_name


def test_formats_resolve_and_the_rest_is_refused_with_the_list():
    assert resolve_format("FP8").quant_algo == "FP8"
    assert resolve_format("nvfp4").needs_cuda and not resolve_format("fp8").needs_cuda
    with pytest.raises(ValueError, match=r"int8_sq.*no vLLM ModelOpt loader.*supported: fp8, fp8_pc_pt"):
        resolve_format("int8_sq")
    with pytest.raises(ValueError, match="supported: " + ", ".join(FORMATS)):
        resolve_format("fp6")


def test_saved_names_follow_the_hub_layout():
    assert saved_name("model.language_model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert saved_name("model.visual.blocks.1.attn.qkv") == "visual.blocks.1.attn.qkv"
    assert saved_name("lm_head") == "lm_head"


def test_exclusions_move_to_saved_names_and_cover_every_kept_linear():
    quantised = ["model.layers.0.self_attn.q_proj"]
    kept = ["visual.blocks.0.attn.qkv", "visual.merger.mlp.0", "lm_head", "model.layers.1.mlp.down_proj"]
    out = fix_exclude_modules(["lm_head", "model.visual*"], quantised, kept)
    # modelopt 0.42 writes ``model.visual*``; the file says ``visual.*``. Unmatched kept ones by name.
    assert out == ["lm_head", "visual*", "model.layers.1.mlp.down_proj"]
    assert fix_exclude_modules(["lm_head", "model.embed_tokens", "visual*"], quantised, kept[:3]) == \
        ["lm_head", "model.embed_tokens", "visual*"]
    with pytest.raises(RuntimeError, match="quantised modules match"):
        fix_exclude_modules(["model.layers.*"], quantised, [])


def test_prompt_settings_come_from_the_training_config_and_flags_override():
    from tools.export_quantized import build_parser, prompt_settings

    args = build_parser().parse_args(["hf", "out", "--data", "d.jsonl", "--config", "examples/configs/tiny_sft.yaml"])
    s = prompt_settings(args)
    assert (s.task, s.image_size, s.prompt_style, s.think) == ("grounding", 112, "detailed", True)
    args = build_parser().parse_args(["hf", "out", "--data", "d.jsonl", "--config", "examples/configs/tiny_sft.yaml",
                                      "--image-size", "56", "--no-think"])
    assert (prompt_settings(args).image_size, prompt_settings(args).think) == (56, False)
