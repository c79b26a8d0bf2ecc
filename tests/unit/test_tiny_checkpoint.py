"""tools/make_tiny_checkpoint.py: a tiny random Qwen2.5-VL checkpoint that transformers loads offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tools.make_tiny_checkpoint import (  # noqa: E402
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_image_processor,
    build_processor,
    build_tokenizer,
    default_mrope_section,
    load_processor,
    make_tiny_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


def _safetensors_keys(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_untied"), seed=0, tied=False)


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), seed=0, tied=True)


@pytest.fixture(scope="module")
def model(ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()


def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(56, 84, 3, generator=g) * 255).to(torch.uint8).numpy()  # H=56, W=84
    b = (torch.rand(112, 112, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a), Image.fromarray(b)]


def _messages(text: str):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_config_values(ckpt):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.model_type == "qwen2_5_vl" and cfg.tie_word_embeddings is False
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (64, 4, 4, 2)
    assert t.intermediate_size == 128 and t.vocab_size == 512 >= len(tok)
    assert t.rope_parameters["mrope_section"] == [2, 3, 3] == default_mrope_section(16)
    assert default_mrope_section(128) == [16, 24, 24]  # the Hub's 7B value
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rms_norm_eps == 1e-6
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size) == (4, 32, 2, 64)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels) == (14, 2, 2, 3)
    assert v.window_size == 56 and list(v.fullatt_block_indexes) == [1, 3] and v.out_hidden_size == 64
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    assert cfg.image_token_id == ids["<|image_pad|>"] and cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"] and cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert t.bos_token_id == ids["<|endoftext|>"] and t.eos_token_id == ids["<|im_end|>"]
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]


def test_tokenizer_special_tokens_and_template(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    base = len(tok) - len(SPECIAL_TOKENS)
    assert ids == list(range(base, len(tok)))  # contiguous after the BPE vocabulary, Hub order
    assert len(tok) < 600
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(f"a{s}b", add_special_tokens=False).count(i) == 1
    text = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find the red circle.<|im_end|>\n"
        '<|im_start|>assistant\n<think>ok</think><answer>[{"bbox_2d": [12, 34, 56, 78], "point_2d": [3, 4]}]'
        "</answer> ünïcode 🙂<|im_end|>"
    )
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text
    assert enc.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert tok.convert_tokens_to_ids("<|im_start|>") in enc
    # digits are single tokens (Qwen pre-tokenizer), the JSON key words are learnt merges
    assert len(tok.encode("1234", add_special_tokens=False)) == 4
    assert len(tok.encode("bbox_2d", add_special_tokens=False)) < len("bbox_2d")

    rendered = tok.apply_chat_template(_messages("Find it."), add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find it.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.chat_template == CHAT_TEMPLATE == (ckpt / "chat_template.jinja").read_text()


def test_processor_and_forward_two_images(ckpt, model):
    from transformers import AutoProcessor

    from visurf_megatron.runtime.torchvision_shim import install_video_placeholder

    # Without torchvision, the shim's video placeholder lets the stock processor load (and refuses videos).
    if install_video_placeholder():
        stock = AutoProcessor.from_pretrained(ckpt)
        with pytest.raises(RuntimeError, match="torchvision"):
            stock.video_processor([])
    else:  # pragma: no cover - the CPU env has no torchvision
        stock = AutoProcessor.from_pretrained(ckpt)
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"
    proc = load_processor(ckpt)
    assert proc.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
    texts = [proc.apply_chat_template(_messages(q), add_generation_prompt=True) for q in ("red circle", "blue square")]
    # left padding: the batch is also used for generate()
    batch = proc(text=texts, images=_images(), padding=True, padding_side="left", return_tensors="pt")
    assert (batch["input_ids"][:, -1] == proc.tokenizer.encode("\n", add_special_tokens=False)[-1]).all()
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 8]]
    # the in-memory processor the tool builds gives the same batch as the saved one
    fresh = build_processor(build_tokenizer(), build_image_processor())
    again = fresh(text=texts, images=_images(), padding=True, padding_side="left", return_tensors="pt")
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert batch["pixel_values"].shape == (24 + 64, 3 * 2 * 14 * 14)
    n_pad = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_pad == [24 // 4, 64 // 4]
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 512)
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[0] == 2 and batch["input_ids"].shape[1] < gen.shape[1] <= batch["input_ids"].shape[1] + 4


def test_window_attention_is_exercised(model):
    # window 56 px = 2x2 merged patches: the 56x84 image (2x3 merged) has 2 windows, 112x112 (4x4) has 4,
    # so the windowed blocks (0, 2) really permute tokens; blocks 1, 3 attend over the whole image.
    from transformers.vision_utils import get_vision_window_index

    v = model.config.vision_config
    window_index, cu_window_seqlens = get_vision_window_index(
        torch.tensor([[1, 4, 6], [1, 8, 8]]), spatial_merge_size=v.spatial_merge_size,
        window_size=v.window_size, patch_size=v.patch_size,
    )
    assert len(cu_window_seqlens) - 1 == 2 + 4
    assert not torch.equal(window_index, torch.arange(len(window_index)))
    assert list(v.fullatt_block_indexes) == [1, 3] and v.depth == 4


def test_key_naming_and_untied_lm_head(ckpt, model):
    keys = _safetensors_keys(ckpt)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert {"model.layers.3.self_attn.q_proj.bias", "model.layers.0.mlp.gate_proj.weight"} <= set(keys)
    assert {"model.norm.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.2.weight"} <= set(keys)
    assert len(keys) == 105  # 2 + 4 layers x 12 + norm; patch_embed + 4 blocks x 12 + merger 5; lm_head
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    assert keys["visual.patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)
    assert not torch.equal(keys["lm_head.weight"], keys["model.embed_tokens.weight"])
    # biases and norms are random too, so a dropped/swapped tensor changes the logits
    assert keys["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    assert not torch.all(keys["model.norm.weight"] == 1)
    assert 0.015 < keys["model.layers.0.mlp.up_proj.weight"].std() < 0.025
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_tied_embeddings(tied_ckpt, ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    keys = _safetensors_keys(tied_ckpt)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads((tied_ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(tied_ckpt)
    assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()
    # every other tensor is the same as in the untied checkpoint of the same seed
    untied = _safetensors_keys(ckpt)
    assert set(untied) - set(keys) == {"lm_head.weight"}
    assert all(torch.equal(keys[k], untied[k]) for k in keys)


def test_same_seed_same_bytes(tmp_path, ckpt):
    a = make_tiny_checkpoint(tmp_path / "a", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert (b / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (ckpt / name).read_bytes()


def test_sharded_output_loads_identically(tmp_path, model):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = make_tiny_checkpoint(tmp_path / "sharded", seed=0, max_shard_size="200KB")
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((d / s).exists() for s in shards)
    assert "lm_head.weight" in index["weight_map"] and "visual.blocks.0.attn.qkv.weight" in index["weight_map"]
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(d)
    ref = model.state_dict()
    got = m.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_bf16_and_size_knobs(tmp_path):
    from transformers import AutoConfig
    from safetensors import safe_open

    d = make_tiny_checkpoint(
        tmp_path / "bf16", seed=3, dtype="bf16", hidden=96, layers=2, heads=6, kv_heads=3, vision_depth=2,
        fullatt_block_indexes=[1],
    )
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 3]  # head_dim 16
    assert cfg.vision_config.out_hidden_size == 96 and list(cfg.vision_config.fullatt_block_indexes) == [1]
    with safe_open(d / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape() == [48, 96]
    with pytest.raises(ValueError, match="mrope_section"):
        make_tiny_checkpoint(tmp_path / "bad", mrope_section=[4, 4, 4])
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_checkpoint(tmp_path / "bad2", vocab_size=256)


def test_cli_help_and_run(tmp_path, capsys):
    from tools.make_tiny_checkpoint import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--tied", "--untied", "--seed", "--hidden", "--layers", "--heads", "--kv-heads", "--intermediate",
                "--vision-depth", "--vision-hidden", "--vocab-size", "--dtype", "--max-shard-size"):
        assert opt in help_text
    # run as a script, from another working directory, with no PYTHONPATH set up
    out = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_checkpoint.py"), str(out), "--tied", "--seed", "0"],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").exists() and (out / "processor_config.json").exists()


def test_qwen2_vl_family_from_the_cli(tmp_path):
    """``--family qwen2_vl``: a Qwen2-VL checkpoint (its vision config, Hub names, processor class) that
    transformers' Auto classes load offline and run on images."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = tmp_path / "qwen2_vl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_checkpoint.py"), str(out), "--family",
                           "qwen2_vl", "--seed", "1"], check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert "wrote tiny qwen2_vl checkpoint" in done.stdout
    cfg = AutoConfig.from_pretrained(out)
    v = cfg.vision_config
    assert cfg.model_type == "qwen2_vl" and type(cfg).__name__ == "Qwen2VLConfig"
    assert (v.depth, v.embed_dim, v.mlp_ratio, v.hidden_size, v.hidden_act) == (4, 32, 2, 64, "quick_gelu")
    keys = _safetensors_keys(out)
    assert {"visual.blocks.0.mlp.fc1.weight", "visual.blocks.0.norm1.bias", "visual.merger.ln_q.bias"} <= set(keys)
    assert not any("gate_proj" in k and k.startswith("visual.") for k in keys)
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    processor = load_processor(out)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    text = processor.apply_chat_template(_messages("where is it?"), add_generation_prompt=True)
    batch = processor(text=[text], images=_images()[:1], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
