"""Shared fixtures: tiny Qwen2.5-VL (or Qwen2-VL) checkpoints and a multimodal batch, with transformers' reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools.make_tiny_checkpoint import load_processor, make_tiny_checkpoint

# (tied, vocab_size): the untied one has a vocabulary that megatron must pad (500 -> 512 rows).
CHECKPOINTS = {"untied": dict(tied=False, vocab_size=500), "tied": dict(tied=True, vocab_size=512)}


def build_checkpoint(root: Path, kind: str, seed: int = 3, family: str = "qwen2_5_vl") -> Path:
    """``family`` is the model_type (``qwen2_5_vl`` or ``qwen2_vl``)."""
    out = root / (f"tiny_{kind}" if family == "qwen2_5_vl" else f"tiny_{family}_{kind}")
    if not (out / "config.json").exists():
        make_tiny_checkpoint(out, seed=seed, family=family, **CHECKPOINTS[kind])
    return out


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def build_batch(hf_dir: Path, pad_to_multiple: int = 2) -> dict:
    """Two samples of different lengths; the first holds 2 images of different sizes. Right-padded."""
    processor = load_processor(hf_dir)
    processor.tokenizer.padding_side = "right"
    rng = np.random.default_rng(0)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "find the red circle and"},
                                      {"type": "image"}, {"type": "text", "text": "the blue square"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "where is it?"}, {"type": "image"}]}],
    ]
    images = [_image(rng, 84, 56), _image(rng, 112, 112), _image(rng, 56, 112)]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    texts[1] += "<think>answer</think>"
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    seq = enc["input_ids"].shape[1]
    pad = (-seq) % pad_to_multiple
    if pad:
        pad_id = processor.tokenizer.pad_token_id
        enc["input_ids"] = torch.cat([enc["input_ids"], torch.full((2, pad), pad_id)], dim=1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.zeros(2, pad, dtype=enc["attention_mask"].dtype)], dim=1)
        if "mm_token_type_ids" in enc:
            enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(2, pad, dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    return {k: v for k, v in enc.items()}


def hf_reference_logits(hf_dir: Path, batch: dict) -> torch.Tensor:
    """transformers' logits, from the checkpoint's family class (by its config's model_type)."""
    import json

    from visurf_megatron.models.families import transformers_class

    model_type = json.loads((Path(hf_dir) / "config.json").read_text())["model_type"]
    model = transformers_class(model_type, "model").from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits
