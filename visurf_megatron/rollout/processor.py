"""Qwen2.5-VL processor and end-token helpers for the rollout engines (no network).

Without torchvision (the CPU environment: no CPU build of it exists for torch 2.13) transformers
cannot build a Qwen2-VL-family processor on its own, because ``from_pretrained`` always loads a
torchvision-only video processor. ``runtime.torchvision_shim.install_video_placeholder`` registers a
placeholder for that slot (videos refused, images through the stock PIL path); vLLM builds its
processor through the same transformers code, so both engines and the trainer tokenise alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from visurf_megatron.runtime.torchvision_shim import install_video_placeholder


def build_processor(tokenizer, image_processor, chat_template: Optional[str] = None, model_type: str = "qwen2_5_vl"):
    """An in-memory ``Qwen2_5_VLProcessor`` (or the processor of ``model_type``'s family, e.g.
    ``Qwen2VLProcessor``) for ``tokenizer`` + ``image_processor`` (the stock video processor where
    torchvision exists, else the placeholder). ``chat_template`` defaults to the tokenizer's."""
    from visurf_megatron.models.families import transformers_class

    processor_class = transformers_class(model_type, "processor")

    template = chat_template if chat_template is not None else tokenizer.chat_template
    if install_video_placeholder():
        from visurf_megatron.runtime.torchvision_shim import video_placeholder_class

        video = video_placeholder_class()()
    else:  # pragma: no cover - torchvision is absent from the CPU env
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=image_processor.patch_size,
                                      temporal_patch_size=image_processor.temporal_patch_size,
                                      merge_size=image_processor.merge_size)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                               chat_template=template)


def load_processor(path: str | os.PathLike):
    """The processor of a checkpoint directory, offline: ``AutoProcessor.from_pretrained(path)``."""
    from transformers import AutoProcessor

    install_video_placeholder()
    return AutoProcessor.from_pretrained(path)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def checkpoint_stop_token_ids(path: str | os.PathLike, tokenizer=None) -> tuple[int, ...]:
    """End tokens of a checkpoint: ``generation_config.json``'s ``eos_token_id`` (one or a list), then
    the tokenizer's eos, then ``config.json``'s eos ids; deduplicated, in that order.

    For Qwen2.5-VL-Instruct this is ``<|im_end|>`` and ``<|endoftext|>``. Both engines stop on these
    plus ``SamplingConfig.stop_token_ids``.
    """
    ids: list[int] = []
    directory = Path(path)
    generation = directory / "generation_config.json"
    if generation.is_file():
        ids += _as_id_list(json.loads(generation.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    config = directory / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        ids += _as_id_list(data.get("eos_token_id"))
        ids += _as_id_list((data.get("text_config") or {}).get("eos_token_id"))
    out: list[int] = []
    for i in ids:
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError(f"no end-of-sequence token id found in {directory} (generation_config.json, tokenizer, config.json)")
    return tuple(out)


def merged_stop_token_ids(checkpoint_ids: tuple[int, ...], extra: tuple[int, ...]) -> tuple[int, ...]:
    """Checkpoint end tokens followed by the extra configured ones, deduplicated."""
    out = list(checkpoint_ids)
    out += [int(t) for t in extra if int(t) not in out]
    return tuple(out)
