"""Prompts for each step: a deterministic, resumable order over the dataset, split over DP ranks.

Epoch e visits the samples in the permutation drawn from ``seed + e``; the position in that order
(``consumed``) is all a checkpoint needs to resume exactly. Prompts are prepared once per sample
(image resized to the configured square, solution scaled into that frame, chat template, processor)
and cached.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from visurf_megatron.data.images import resize_square, scale_objects
from visurf_megatron.data.prompts import build_prompt
from visurf_megatron.data.samples import Sample

from .batching import PreparedPrompt


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng(seed + epoch).permutation(num_samples)


class PromptFeed:
    """``next_batch()`` -> this DP rank's samples of the next global batch of ``prompts_per_step``."""

    def __init__(self, samples: Sequence[Sample], *, prompts_per_step: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True, consumed: int = 0):
        if not samples:
            raise ValueError("the training set is empty")
        if prompts_per_step % dp_size:
            raise ValueError(f"data.prompts_per_step={prompts_per_step} must be divisible by the "
                             f"data-parallel size {dp_size}")
        self.samples = list(samples)
        self.prompts_per_step, self.dp_rank, self.dp_size = prompts_per_step, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed = consumed  # global samples handed out so far (all DP ranks)

    def _global_indices(self, start: int, count: int) -> list[int]:
        n = len(self.samples)
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, n)
            out.append(int(epoch_order(n, self.seed, epoch, self.shuffle)[offset]))
        return out

    def next_batch(self) -> list[Sample]:
        indices = self._global_indices(self.consumed, self.prompts_per_step)
        self.consumed += self.prompts_per_step
        per_rank = self.prompts_per_step // self.dp_size
        mine = indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [self.samples[i] for i in mine]


class PromptPreparer:
    """Sample -> ``PreparedPrompt`` (cached by sample id)."""

    def __init__(self, processor, *, image_size: int, prompt_style: str, think: bool, cache_size: int = 4096):
        self.processor = processor
        self.image_size, self.prompt_style, self.think = image_size, prompt_style, think
        self._prepare = lru_cache(maxsize=cache_size)(self._prepare_uncached)
        self._by_id: dict[str, Sample] = {}

    def __call__(self, sample: Sample) -> PreparedPrompt:
        self._by_id[sample.id] = sample
        return self._prepare(sample.id)

    def frame_solution(self, sample: Sample, sx: float, sy: float):
        """The reward target in the resized image's frame (grounding-like tasks carry coordinates)."""
        if sample.task == "grounding":
            return scale_objects(sample.solution, sx, sy, to_int=True)
        if sample.task == "gui":
            x1, y1, x2, y2 = sample.solution
            return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
        if sample.task == "math":
            return {"answer": sample.solution, "choices": sample.choices}
        return sample.solution

    def _prepare_uncached(self, sample_id: str) -> PreparedPrompt:
        sample = self._by_id[sample_id]
        images, sx, sy = [], 1.0, 1.0
        if sample.has_image:
            image, sx, sy = resize_square(sample.load_image(), self.image_size)
            images.append(image)
        text = build_prompt(sample, style=self.prompt_style, think=self.think)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        return PreparedPrompt(
            sample_id=sample.id, text=prompt, images=images, input_ids=enc["input_ids"][0],
            pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
            solution=self.frame_solution(sample, sx, sy), sample=sample,
        )
