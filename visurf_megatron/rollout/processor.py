"""Qwen2.5-VL processor and end-token helpers for the rollout engines (no network, no torchvision).

transformers 5.20.2 cannot build any Qwen2-VL-family processor without torchvision: the video slot's
base class (``VideoProcessorMixin``) only exists with torchvision and ``AutoProcessor.from_pretrained``
always loads ``Qwen2VLVideoProcessor`` (huggingface/transformers#48558). torchvision cannot be installed
beside the CPU torch 2.13 wheel, so without it ``load_processor`` builds the same ``Qwen2_5_VLProcessor``
(images and text take exactly the stock code path) with no video processor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def image_only_processor_class():
    """``Qwen2_5_VLProcessor`` subclass that accepts ``video_processor=None``."""
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen2_5_VLImageOnlyProcessor


def build_processor(tokenizer, image_processor, chat_template: Optional[str] = None):
    """An in-memory Qwen2.5-VL processor for ``tokenizer`` + ``image_processor``: the stock
    ``Qwen2_5_VLProcessor`` when torchvision is available, else the image-only one.
    ``chat_template`` defaults to the tokenizer's."""
    from transformers.utils import is_torchvision_available

    template = chat_template if chat_template is not None else tokenizer.chat_template
    if is_torchvision_available():  # pragma: no cover - torchvision is absent from the CPU env
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(
            patch_size=image_processor.patch_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            merge_size=image_processor.merge_size,
        )
        return Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=template
        )
    cls = image_only_processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template)


def load_processor(path: str | os.PathLike):
    """The processor of a checkpoint directory, offline.

    ``AutoProcessor.from_pretrained(path)`` where torchvision is installed; otherwise the same
    ``Qwen2_5_VLProcessor`` built from ``AutoTokenizer`` + ``AutoImageProcessor`` (PIL backend) and the
    saved chat template, with no video processor.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():  # pragma: no cover - torchvision is absent from the CPU env
        return AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else tokenizer.chat_template
    return build_processor(tokenizer, image_processor, chat_template=template)


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
