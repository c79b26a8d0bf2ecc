"""Calibration and held-out prompts for quantised exports, and the fidelity figures.

Prompts go through exactly what training feeds the policy (``PromptPreparer``: image resized to the
configured square, task prompt template, chat template) and then through the processor as the serving
engine receives them (text + images), so calibration sees the activation ranges served prompts produce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

Progress = Callable[[Iterable, str, int], Iterable]


def no_progress(items: Iterable, desc: str, total: int) -> Iterable:
    return items


@dataclass(frozen=True)
class PromptSettings:
    """The training run's ``data.*`` settings that shape a prompt (see ``config.DataConfig``)."""

    task: str = "grounding"
    image_size: int = 840
    prompt_style: str = "detailed"
    think: bool = True


def load_prompt_samples(data: str | Path, *, count: int, task: str, image_root=None, skip: int = 0):
    """The first ``count`` samples of a dataset in our formats after ``skip`` rows (deterministic)."""
    from visurf_megatron.data.samples import load_samples

    if count <= 0:
        return []
    loaded = load_samples(data, task=task, image_root=image_root, limit=skip + count).samples[skip:]
    if len(loaded) < count:
        raise ValueError(f"{data}: needs {skip + count} samples ({skip} before these {count}), has {skip + len(loaded)}")
    return loaded


def encode_prompts(samples: Sequence, processor, settings: PromptSettings) -> list[dict]:
    """Samples -> processor outputs (``input_ids``, ``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids`` ...), one dict per prompt with a batch dimension of 1.

    ``mm_token_type_ids`` is why the processor runs again on the prepared text: transformers needs it
    to build Qwen2.5-VL's 3-row mrope positions, and ``PreparedPrompt`` does not keep it.
    """
    from visurf_megatron.training.data_feed import PromptPreparer

    preparer = PromptPreparer(processor, image_size=settings.image_size, prompt_style=settings.prompt_style,
                              think=settings.think)
    out = []
    for sample in samples:
        prepared = preparer(sample)
        enc = processor(text=[prepared.text], images=list(prepared.images) or None, return_tensors="pt")
        out.append(dict(enc))
    return out


def _to(enc: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}


@torch.no_grad()
def forward_logits(model, enc: dict) -> torch.Tensor:
    """Logits ``[T, V]`` (float32, on CPU) of one prompt."""
    device = next(model.parameters()).device
    return model(**_to(enc, device)).logits[0].float().cpu()


def text_positions(enc: dict, skip_token_ids: Sequence[int]) -> torch.Tensor:
    """Positions whose next-token prediction a served model can emit: every position but the image
    placeholders (their logits are never sampled)."""
    ids = enc["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    for t in skip_token_ids:
        keep &= ids != t
    return keep


@dataclass
class Fidelity:
    """KL(reference || quantised) per token and top-1 agreement, accumulated over prompts."""

    kl_sum: float = 0.0
    kl_max: float = 0.0
    ref_var_sum: float = 0.0  # per-position variance of the reference logits over the vocabulary
    agree: int = 0
    tokens: int = 0
    prompts: int = 0

    def add(self, ref_logprobs: torch.Tensor, quant_logits: torch.Tensor) -> None:
        """``ref_logprobs``: reference log-softmax ``[N, V]``; ``quant_logits``: the quantised model's
        logits at the same ``N`` positions."""
        q = torch.log_softmax(quant_logits.double(), dim=-1)
        p = ref_logprobs.double()
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)  # rounding can make a zero KL slightly negative
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max())) if kl.numel() else self.kl_max
        self.agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        # log-softmax is the logits shifted per position: same spread over the vocabulary.
        self.ref_var_sum += float(p.var(dim=-1, unbiased=False).sum())
        self.tokens += int(kl.numel())
        self.prompts += 1

    def as_dict(self) -> dict:
        if not self.tokens:
            raise ValueError("no held-out tokens were scored")
        out = {"mean_kl_per_token": self.kl_sum / self.tokens, "max_kl_per_token": self.kl_max,
               "top1_agreement": self.agree / self.tokens, "tokens": self.tokens, "prompts": self.prompts,
               # The scale a KL is small against: KL(p||q) ~ Var_p(logit change) / 2.
               "reference_logit_std_rms": math.sqrt(self.ref_var_sum / self.tokens)}
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"fidelity figure {k} is {v}")
        return out


def reference_logprobs(model, encodings: Sequence[dict], skip_token_ids: Sequence[int],
                       progress: Progress = no_progress) -> list[torch.Tensor]:
    """The unquantised model's log-softmax at the scored positions of each held-out prompt
    (kept on CPU: the quantised pass replaces the weights in place)."""
    out = []
    for enc in progress(encodings, "reference logits", len(encodings)):
        logits = forward_logits(model, enc)[text_positions(enc, skip_token_ids)]
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def measure_fidelity(model, encodings: Sequence[dict], reference: Sequence[torch.Tensor],
                     skip_token_ids: Sequence[int], progress: Progress = no_progress) -> dict:
    fid = Fidelity()
    for enc, ref in zip(progress(encodings, "fidelity", len(encodings)), reference):
        fid.add(ref, forward_logits(model, enc)[text_positions(enc, skip_token_ids)])
    return fid.as_dict()


def calibration_loop(encodings: Sequence[dict], progress: Progress = no_progress,
                     ) -> Callable[[torch.nn.Module], None]:
    """modelopt's ``forward_loop``: every calibration prompt once through the model (AWQ calls it
    more than once)."""
    def forward_loop(model) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for enc in progress(encodings, "calibration", len(encodings)):
                model(**_to(enc, device))
    return forward_loop

