"""The rollout-engine contract shared by the transformers (reference) and vLLM (GPU and CPU) engines.

A training step drives an engine like this (see ``sync.refresh_engine_weights``)::

    engine.wake_up(tags=["weights"])                      # weights memory back (contents stale)
    engine.update_weights(export_hf_weights(model_chunks))  # (hf_name, full tensor) stream
    engine.wake_up(tags=["kv_cache"])
    groups = engine.generate(requests, SamplingConfig.from_config(cfg.rollout))
    engine.sleep()                                        # free accelerator memory for training

Conventions every engine follows (the trainer relies on them):

* **Requests** are already chat-templated prompt text holding one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image, plus the PIL images in order.
* **Completions**: ``generate`` returns, per request, ``n`` completions in sample order.
  ``response_token_ids`` stop at (and include) the first stop token when ``finish_reason == "stop"``;
  with ``"length"`` they hold exactly ``max_new_tokens`` tokens. ``text`` is the decoded response
  without special tokens.
* **Log-probs** (``Completion.logprobs``, one per response token) are the log-probabilities of the
  sampled tokens under the *sampling distribution at temperature T with top-p / top-k off*:
  ``log_softmax(logits / T)[token]`` (``T = 1`` for greedy, ``temperature == 0``). They are directly
  comparable with the trainer's ``Qwen25VLModel(..., labels=..., temperature=T)`` output. With
  top-p / top-k enabled, vLLM's ``processed_logprobs`` are renormalised over the kept tokens while the
  transformers engine keeps the untruncated ones; keep them off for importance ratios.
* **Seeds**: request ``i`` of the ``k``-th ``generate`` call samples with seed
  ``request_seed(sampling.seed, k, i, n)``; sample ``j`` of it uses that seed ``+ j`` (vLLM's own rule
  for ``n > 1``). All ranks of one rollout tensor-parallel group must pass identical requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]

#: Tags understood by ``wake_up`` (vLLM's sleep-mode memory pools).
WAKE_TAGS = ("weights", "kv_cache")


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt: chat-templated text (with one image placeholder per image) and its PIL images."""

    prompt: str
    images: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError("RolloutRequest.prompt must be a non-empty string")
        object.__setattr__(self, "images", tuple(self.images))
        slots = self.prompt.count("<|image_pad|>")
        if slots != len(self.images):
            raise ValueError(
                f"prompt holds {slots} <|image_pad|> placeholders but {len(self.images)} images were given"
            )


@dataclass(frozen=True)
class Completion:
    """One sampled response of one request."""

    prompt_token_ids: tuple[int, ...]  # as the engine tokenised it (image placeholders expanded)
    response_token_ids: tuple[int, ...]  # up to and including the stop token (see module doc)
    text: str  # decoded response, special tokens skipped
    logprobs: tuple[float, ...]  # log_softmax(logits / T) of each response token
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.response_token_ids):
            raise ValueError(
                f"{len(self.logprobs)} log-probs for {len(self.response_token_ids)} response tokens"
            )
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one ``generate`` call (engine independent).

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` mean off. ``stop_token_ids`` are
    added to the checkpoint's own end tokens (``generation_config.json`` eos ids and the tokenizer's
    eos), which always stop. ``seed=None`` gives unseeded sampling.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.greedy and self.n > 1:
            raise ValueError("greedy decoding (temperature 0) with n > 1 would repeat one response n times")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The T of ``log_softmax(logits / T)`` that ``Completion.logprobs`` use (1 when greedy)."""
        return 1.0 if self.greedy else float(self.temperature)

    @classmethod
    def from_config(cls, rollout_config, *, stop_token_ids: Sequence[int] = (), **overrides) -> "SamplingConfig":
        """From ``config.RolloutConfig`` (n, temperature, top_p, top_k, max_new_tokens, seed)."""
        values = dict(
            n=rollout_config.n,
            temperature=rollout_config.temperature,
            top_p=rollout_config.top_p,
            top_k=rollout_config.top_k,
            max_new_tokens=rollout_config.max_new_tokens,
            seed=rollout_config.seed,
            stop_token_ids=tuple(stop_token_ids),
        )
        values.update(overrides)
        return cls(**values)


def request_seed(base: Optional[int], call_index: int, request_index: int, n: int) -> Optional[int]:
    """Seed of request ``request_index`` in the ``call_index``-th ``generate`` call (None: unseeded).

    ``base + call_index * 1_000_003 + request_index * n`` (mod 2**31 - 1); sample ``j < n`` of the request
    uses that ``+ j``, so no two samples of a run share a seed while a call holds < 1e6 samples.
    """
    if base is None:
        return None
    return (int(base) + int(call_index) * 1_000_003 + int(request_index) * max(int(n), 1)) % (2**31 - 1)


def trim_at_stop(token_ids: Sequence[int], stop_ids: Iterable[int], max_new_tokens: int) -> tuple[list[int], FinishReason]:
    """Cut a generated row after its first stop token; ``"length"`` if none within ``max_new_tokens``."""
    stops = set(int(s) for s in stop_ids)
    for i, token in enumerate(token_ids[:max_new_tokens]):
        if int(token) in stops:
            return [int(t) for t in token_ids[: i + 1]], "stop"
    return [int(t) for t in token_ids[:max_new_tokens]], "length"


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors (Hub naming ``model.layers.*`` / ``visual.*``, or the in-memory
        ``model.language_model.*`` / ``model.visual.*``). A partial stream updates those tensors only.
        Collective for SPMD engines: every rank must pass its stream in the same order."""

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 first_index: int = 0) -> list[list[Completion]]:
        """``sampling.n`` completions per request, in request order. Request ``i`` samples with the seed
        of index ``first_index + i``, so a list split into shares samples what it samples whole."""

    def sleep(self, level: int = ...) -> None:
        """Release accelerator memory for training (level 1: weights offloaded, level 2: discarded)."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-acquire memory (``tags`` subset of ``WAKE_TAGS``; None: all). After a level-2 sleep the
        weights must be updated before ``generate``."""

    def shutdown(self) -> None:
        """Release the engine for good (collective for SPMD engines); the process groups stay."""


@dataclass
class EngineState:
    """Sleep bookkeeping shared by the engines: what is resident, what must be reloaded."""

    asleep: set[str] = field(default_factory=set)
    weights_stale: bool = True  # no full update since construction / level-2 sleep

    def check_tags(self, tags: Optional[Sequence[str]]) -> tuple[str, ...]:
        tags = WAKE_TAGS if tags is None else tuple(tags)
        unknown = [t for t in tags if t not in WAKE_TAGS]
        if unknown:
            raise ValueError(f"unknown wake_up tags {unknown}; known: {list(WAKE_TAGS)}")
        return tags

    def require_ready(self) -> None:
        if self.asleep:
            raise RuntimeError(f"engine is asleep ({sorted(self.asleep)}); call wake_up() before generate()")
        if self.weights_stale:
            raise RuntimeError("engine weights were never loaded (or were discarded by sleep(level=2)); "
                               "call update_weights() before generate()")
