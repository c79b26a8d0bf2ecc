#!/usr/bin/env python
"""Write a tiny, random, fully local Qwen2.5-VL (or, ``--family qwen2_vl``, Qwen2-VL) HF checkpoint directory.

The directory loads with no network through
``transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)``, ``AutoImageProcessor.from_pretrained(dir)`` and, where
torchvision is installed, ``AutoProcessor.from_pretrained(dir)``. transformers 5.20.2 cannot build any
Qwen2-VL-family processor without torchvision (its video slot needs it, huggingface/transformers#48558),
and torchvision cannot be installed beside the CPU torch 2.13 wheel; ``load_processor(dir)`` returns the
same ``Qwen2_5_VLProcessor`` code path (image + text, no video processor) in that case. It holds:

* ``config.json`` / ``generation_config.json`` (transformers' own layout: ``text_config`` and
  ``vision_config`` sub-dicts, ``tie_word_embeddings`` at the top level),
* ``model.safetensors`` or shards + ``model.safetensors.index.json``, written by ``save_pretrained``
  (Hub key naming: ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``, ``visual.*``,
  ``lm_head.weight`` only when the embeddings are untied),
* a byte-level BPE tokenizer trained here, deterministically, on a small built-in corpus
  (``tokenizer.json`` + ``tokenizer_config.json``, class ``Qwen2Tokenizer``) with the Qwen special
  tokens and the Qwen2.5-VL chat template,
* the image processor and processor configs (small ``min_pixels`` / ``max_pixels``).

Every parameter is drawn from its own generator seeded by ``(seed, parameter name)``: the same seed
gives byte-identical safetensors, whatever the other knobs. Biases are random (not zero) and norm
weights are ``1 + noise`` so that a converter that drops or swaps one of them changes the logits.

Usage::

    python tools/make_tiny_checkpoint.py OUT_DIR [--seed 0] [--tied|--untied] [--dtype fp32|bf16]
        [--max-shard-size 200KB] [--hidden 64 --layers 4 --heads 4 --kv-heads 2 ...]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import torch

# The processor-building logic lives in the package (the rollout engines need it); re-exported here.
from visurf_megatron.rollout.processor import build_processor as _build_processor
from visurf_megatron.rollout.processor import load_processor  # noqa: F401  (re-export)

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

#: Qwen2.5-VL special tokens, in the Hub tokenizer's id order (151643 .. 151656 there).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The official Qwen2.5-VL-Instruct chat template (chat_template.json on the Hub).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Training text for the tiny BPE: the prompt / answer vocabulary of grounding, GUI, math and
#: anomaly tasks, JSON punctuation and the chat-template scaffolding.
_CORPUS: tuple[str, ...] = (
    "system\nYou are a helpful assistant.",
    "user\nassistant\n",
    "Please find the red circle in the image. Output the thinking process in <think> </think> and "
    "final answer in <answer> </answer> tags. Output the bbox_2d and point_2d of the object in "
    'JSON format, e.g. <answer>[{"bbox_2d": [10, 100, 200, 210], "point_2d": [30, 110]}]</answer>',
    "Locate the blue square, the green triangle and the yellow star. If there is no such object, "
    "output an empty list [] in the answer.",
    "<think>The red circle is at the top left of the image, near the blue square.</think>"
    '<answer>[{"bbox_2d": [12, 34, 56, 78], "point_2d": [34, 56]}]</answer>',
    "<think>There is no green triangle in the image.</think><answer>[]</answer>",
    '<answer>[{"bbox_2d": [120, 340, 560, 780], "point_2d": [340, 560]}, '
    '{"bbox_2d": [0, 9, 87, 65], "point_2d": [43, 21]}]</answer>',
    '{"bbox_2d": [1, 2, 3, 4], "point_2d": [5, 6], "label": "red circle"}',
    "Question: what is the value of x? Answer with the final number in \\boxed{}. "
    "The answer is \\boxed{42}. Choices: (A) 1 (B) 2 (C) 3 (D) 4.",
    "Click on the button. Is there an anomaly in the image? yes or no. The object is a circle, "
    "a square, a triangle, a star or a dot; its colour is red, blue, green, yellow, white or black.",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 200 500 840",
    "first, then, the object, the image, the answer, the thinking, the output, the format.",
)

#: Number of BPE merges learnt (fewer only if the corpus runs out of adjacent pairs).
DEFAULT_NUM_MERGES = 200


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, ordered as GPT-2 / Qwen order them (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_bpe(corpus: Iterable[str] = _CORPUS, num_merges: int = DEFAULT_NUM_MERGES):
    """A small, deterministic byte-level BPE trainer (pure Python; ties broken lexicographically).

    Returns ``(vocab, merges)``: ``vocab`` maps token -> id (256 byte symbols, then one token per
    merge), ``merges`` is a list of ``(left, right)`` pairs in merge order.
    """
    pre = _pre_tokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for text in corpus:
        for word, _ in pre.pre_tokenize_str(text):
            counts[word] += 1
    words = {w: list(w) for w in sorted(counts)}
    vocab = {sym: i for i, sym in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        a, b = best[0]
        merged = a + b
        merges.append((a, b))
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return vocab, merges


def build_tokenizer(num_merges: int = DEFAULT_NUM_MERGES):
    """A ``Qwen2Tokenizer`` with the tiny BPE, the Qwen special tokens (ids right after the BPE
    vocabulary, in Hub order), ``<|im_end|>`` as eos, ``<|endoftext|>`` as pad, no bos / unk, and
    the Qwen2.5-VL chat template."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = train_bpe(num_merges=num_merges)
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    base = len(vocab)
    got = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if got != list(range(base, base + len(SPECIAL_TOKENS))):  # pragma: no cover - construction check
        raise RuntimeError(f"special token ids {got} are not {base}..{base + len(SPECIAL_TOKENS) - 1}")
    return tok


# ---------------------------------------------------------------------------------------------
# Model config and weights
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Size knobs of the tiny model (defaults = the project's default tiny checkpoint)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab_size: int = 512
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] | None = None  # None: every second block (1, 3, ...)
    mrope_section: tuple[int, int, int] | None = None  # None: head_dim/2 split 1:1.5:1.5
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tied: bool = False
    family: str = "qwen2_5_vl"  # the model_type; qwen2_vl ignores window_size / fullatt_block_indexes


def default_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` rotary frequencies into (t, h, w) like the Hub's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t + 1) // 2
    w = half - t - h
    return [t, h, w]


def build_config(
    spec: TinySpec, token_ids: dict[str, int], tokenizer_len: int, dtype: torch.dtype = torch.float32
):
    """The ``Qwen2_5_VLConfig`` / ``Qwen2VLConfig`` (``spec.family``) for ``spec``; ``token_ids`` maps the
    special token strings to ids and ``tokenizer_len`` is the tokenizer's length (``spec.vocab_size``
    must cover it)."""
    from visurf_megatron.models.families import transformers_class

    if spec.hidden % spec.heads:
        raise ValueError(f"hidden {spec.hidden} not divisible by heads {spec.heads}")
    if spec.heads % spec.kv_heads:
        raise ValueError(f"heads {spec.heads} not divisible by kv_heads {spec.kv_heads}")
    head_dim = spec.hidden // spec.heads
    if head_dim % 2:
        raise ValueError(f"text head_dim {head_dim} must be even")
    mrope = list(spec.mrope_section) if spec.mrope_section is not None else default_mrope_section(head_dim)
    if len(mrope) != 3 or sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope} must be 3 numbers summing to head_dim/2 = {head_dim // 2}")
    if spec.vision_hidden % spec.vision_heads:
        raise ValueError(f"vision_hidden {spec.vision_hidden} not divisible by vision_heads {spec.vision_heads}")
    if (spec.vision_hidden // spec.vision_heads) % 4:
        raise ValueError("vision head_dim must be divisible by 4 (2-D rotary over h and w)")
    patch, merge = 14, 2
    if spec.window_size % (patch * merge):
        raise ValueError(f"window_size {spec.window_size} must be a multiple of patch*merge = {patch * merge}")
    fullatt = (
        list(spec.fullatt_block_indexes)
        if spec.fullatt_block_indexes is not None
        else [i for i in range(spec.vision_depth) if i % 2 == 1]
    )
    if any(not 0 <= i < spec.vision_depth for i in fullatt):
        raise ValueError(f"fullatt_block_indexes {fullatt} out of range for depth {spec.vision_depth}")
    if spec.vocab_size < tokenizer_len:
        raise ValueError(f"vocab_size {spec.vocab_size} < tokenizer length {tokenizer_len}")

    vision_qwen25 = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden, hidden_act="silu",
        intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads, in_channels=3, patch_size=patch,
        spatial_merge_size=merge, temporal_patch_size=2, tokens_per_second=2, window_size=spec.window_size,
        out_hidden_size=spec.hidden, fullatt_block_indexes=fullatt, initializer_range=0.02,
    )
    if spec.family == "qwen2_vl" and spec.vision_intermediate % spec.vision_hidden:
        raise ValueError(f"qwen2_vl: vision_intermediate {spec.vision_intermediate} must be a multiple of "
                         f"vision_hidden {spec.vision_hidden} (Qwen2-VL declares an integer mlp_ratio)")
    # Qwen2-VL: the tower's width is embed_dim, hidden_size is the merger's output, MLP = mlp_ratio x.
    vision_qwen2 = dict(
        depth=spec.vision_depth, embed_dim=spec.vision_hidden, hidden_size=spec.hidden, hidden_act="quick_gelu",
        mlp_ratio=spec.vision_intermediate // spec.vision_hidden, num_heads=spec.vision_heads, in_channels=3,
        patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, initializer_range=0.02,
    )
    eot, im_end = token_ids["<|endoftext|>"], token_ids["<|im_end|>"]
    cfg = transformers_class(spec.family, "config")(
        text_config=dict(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            hidden_act="silu",
            max_position_embeddings=spec.max_position_embeddings,
            initializer_range=0.02,
            rms_norm_eps=spec.rms_norm_eps,
            use_cache=True,
            use_sliding_window=False,
            max_window_layers=spec.layers,
            attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": mrope},
            bos_token_id=eot,
            eos_token_id=im_end,
            pad_token_id=eot,
        ),
        vision_config=vision_qwen2 if spec.family == "qwen2_vl" else vision_qwen25,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=spec.tied,
    )
    cfg.dtype = dtype
    cfg.text_config.dtype = dtype
    cfg.vision_config.dtype = dtype
    return cfg


_NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight")


def _param_seed(seed: int, name: str) -> int:
    return ((int(seed) & 0xFFFFFFFF) << 31 ^ zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float = 0.02, norm_std: float = 0.1) -> None:
    """Deterministic init: each parameter from its own generator seeded by (seed, name).

    Norm weights are ``1 + N(0, norm_std)``; every other tensor (weights and biases) is
    ``N(0, std)``. Tied parameters are visited once (under their first name).
    """
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(_param_seed(seed, name))
        if name.endswith(_NORM_SUFFIXES):
            t = 1.0 + norm_std * torch.randn(p.shape, generator=g, dtype=torch.float32)
        else:
            t = std * torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(t.to(p.dtype))


# ---------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------


def build_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 256):
    """Qwen2-VL image processor (PIL backend: no torchvision needed) with small pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def build_processor(tokenizer, image_processor, family: str = "qwen2_5_vl"):
    """An in-memory Qwen2.5-VL / Qwen2-VL processor (see ``visurf_megatron.rollout.processor.build_processor``)
    with the official chat template (the same for both families)."""
    return _build_processor(tokenizer, image_processor, chat_template=CHAT_TEMPLATE, model_type=family)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_processor_files(out: Path, tokenizer, image_processor, family: str = "qwen2_5_vl") -> None:
    """Write the tokenizer / image-processor / processor files the way a Hub Qwen2.5-VL repo and
    transformers 5.20.2's ``Qwen2_5_VLProcessor.save_pretrained`` lay them out.

    ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (tokenizer save),
    ``preprocessor_config.json`` (image processor; also what ``AutoVideoProcessor`` falls back to,
    inferring ``Qwen2VLVideoProcessor`` from ``Qwen2VLImageProcessor``) and ``processor_config.json``
    (v5 nested form, ``processor_class: Qwen2_5_VLProcessor``).
    """
    from visurf_megatron.models.families import family as model_family

    processor_class = model_family(family).hf_processor_class
    if hasattr(tokenizer, "_set_processor_class"):
        tokenizer._set_processor_class(processor_class)
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").exists():  # pragma: no cover - transformers 5 writes it
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    image_dict = image_processor.to_dict()
    image_dict["image_processor_type"] = "Qwen2VLImageProcessor"  # backend-neutral: auto picks PIL/torchvision
    _write_json(out / "preprocessor_config.json", {**image_dict, "processor_class": processor_class})
    _write_json(out / "processor_config.json", {"image_processor": image_dict, "processor_class": processor_class})


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def make_tiny_checkpoint(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    tied: bool = False,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    window_size: int = 56,
    fullatt_block_indexes: Sequence[int] | None = None,
    mrope_section: Sequence[int] | None = None,
    dtype: str | torch.dtype = "fp32",
    max_shard_size: str | int | None = None,
    init_std: float = 0.02,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 256,
    family: str = "qwen2_5_vl",
) -> Path:
    """Write the tiny checkpoint to ``output_dir`` (created if needed) and return its path.

    ``max_shard_size`` (e.g. ``"200KB"`` or a byte count) shards the safetensors and writes
    ``model.safetensors.index.json``; ``None`` writes one ``model.safetensors``.
    """
    from transformers import GenerationConfig

    from visurf_megatron.models.families import transformers_class

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if torch_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype}")

    tokenizer = build_tokenizer()
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    spec = TinySpec(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        vision_depth=vision_depth,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
        window_size=window_size,
        fullatt_block_indexes=tuple(fullatt_block_indexes) if fullatt_block_indexes is not None else None,
        mrope_section=tuple(mrope_section) if mrope_section is not None else None,
        tied=tied,
        family=family,
    )
    config = build_config(spec, token_ids, len(tokenizer), torch_dtype)

    model = transformers_class(family, "model")(config)
    init_weights(model, seed, std=init_std)
    model = model.to(torch_dtype).eval()
    eot, im_end = token_ids["<|endoftext|>"], token_ids["<|im_end|>"]
    model.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=[im_end, eot],
        pad_token_id=eot,
        do_sample=False,
    )

    save_kwargs = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    else:
        save_kwargs["max_shard_size"] = "100GB"
    model.save_pretrained(out, **save_kwargs)

    save_processor_files(out, tokenizer, build_image_processor(min_pixels, max_pixels), family)
    return out


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a tiny random Qwen2.5-VL HF checkpoint (config, safetensors, locally trained "
        "tokenizer, processor) that transformers loads with no network."
    )
    p.add_argument("output_dir", help="directory to write the checkpoint into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights; same seed -> same bytes (%(default)s)")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", help="tie lm_head to the embeddings (like 3B)")
    tie.add_argument("--untied", dest="tied", action="store_false", help="own lm_head.weight (like 7B+; default)")
    p.set_defaults(tied=False)
    sizes = [
        ("--hidden", 64, "text hidden size, also the merger's output size"),
        ("--layers", 4, "text decoder layers"),
        ("--heads", 4, "text attention heads"),
        ("--kv-heads", 2, "text key/value heads (GQA query groups)"),
        ("--intermediate", 128, "text MLP intermediate size"),
        ("--vocab-size", 512, "embedding rows; must be >= the tokenizer length"),
        ("--vision-depth", 4, "vision transformer blocks"),
        ("--vision-hidden", 32, "vision hidden size"),
        ("--vision-heads", 2, "vision attention heads (vision head dim divisible by 4)"),
        ("--vision-intermediate", 64, "vision MLP intermediate size"),
        ("--window-size", 56, "vision window-attention size in pixels (multiple of 28)"),
        ("--min-pixels", 56 * 56, "image processor min_pixels"),
        ("--max-pixels", 28 * 28 * 256, "image processor max_pixels"),
    ]
    for flag, default, text in sizes:
        p.add_argument(flag, type=int, default=default, help=f"{text} (%(default)s)")
    p.add_argument(
        "--fullatt-block-indexes",
        type=_int_list,
        default=None,
        help="comma-separated vision blocks with full attention (unset: every second block, 1,3,...)",
    )
    p.add_argument(
        "--mrope-section",
        type=_int_list,
        default=None,
        help="comma-separated t,h,w rotary sections summing to head_dim/2 (unset: derived, 2,3,3 for head_dim 16)",
    )
    p.add_argument("--family", choices=["qwen2_5_vl", "qwen2_vl"], default="qwen2_5_vl",
                   help="model_type to write: Qwen2.5-VL or Qwen2-VL (%(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the saved weights (%(default)s)")
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="shard the safetensors at this size (e.g. 200KB, or a byte count) and write "
        "model.safetensors.index.json (unset: one model.safetensors)",
    )
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights and biases (%(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse_args(argv)
    shard = a.max_shard_size
    out = make_tiny_checkpoint(
        a.output_dir,
        seed=a.seed,
        tied=a.tied,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        intermediate=a.intermediate,
        vocab_size=a.vocab_size,
        vision_depth=a.vision_depth,
        vision_hidden=a.vision_hidden,
        vision_heads=a.vision_heads,
        vision_intermediate=a.vision_intermediate,
        window_size=a.window_size,
        fullatt_block_indexes=a.fullatt_block_indexes,
        mrope_section=a.mrope_section,
        dtype=a.dtype,
        max_shard_size=int(shard) if shard and shard.isdigit() else shard,
        init_std=a.init_std,
        min_pixels=a.min_pixels,
        max_pixels=a.max_pixels,
        family=a.family,
    )
    print(f"wrote tiny {a.family} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
