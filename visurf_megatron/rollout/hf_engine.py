"""Rollout engine on transformers' ``Qwen2_5_VLForConditionalGeneration`` (CPU or GPU).

It is the reference the tests use and the engine of CPU runs: it takes weights only through
``update_weights`` (the same ``(hf_name, tensor)`` stream vLLM's ``load_weights`` takes), builds the
multimodal inputs with the checkpoint's processor and samples with ``generate()``.

* The model is built from the checkpoint's ``config.json`` with transformers' random init (cheap for
  the tiny models this engine serves; it is not meant for 7B+ on CPU). ``generate`` refuses to run
  until every parameter was loaded once.
* Requests are generated one at a time (``n`` rows of the same prompt through ``num_return_sequences``,
  so no padding enters the numerics), seeded per request (see ``base.request_seed``) under a forked
  RNG, so the global RNG of the trainer is untouched.
* Log-probs: ``output_logits=True`` gives the **raw** logits of each step (before temperature, top-k,
  top-p); ``Completion.logprobs = log_softmax(raw_logits / T)[sampled token]`` in fp32 with
  ``T = sampling.logprob_temperature``: the sampling distribution at temperature T with top-p / top-k
  off, as the trainer computes it.
* Sleep: level 1 offloads the weights to CPU (a no-op when the engine already runs on CPU); level 2
  discards them (parameters go to the ``meta`` device, buffers are kept on CPU), so ``wake_up`` must be
  followed by a full ``update_weights`` before ``generate``. The KV cache only lives inside a
  ``generate`` call, so the ``kv_cache`` tag has nothing to free or restore.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..checkpoint.mapping import hub_name, inmemory_name
from ..runtime import cpu
from .base import Completion, EngineState, RolloutRequest, SamplingConfig, request_seed, trim_at_stop
from .processor import checkpoint_stop_token_ids, load_processor, merged_stop_token_ids


def hf_generation_kwargs(sampling: SamplingConfig, stop_token_ids: Sequence[int], pad_token_id: int) -> dict:
    """``GenerationConfig`` fields for ``sampling`` (pure; every field that could inherit a checkpoint
    default such as transformers' ``top_k=50`` or a Hub ``repetition_penalty`` is set explicitly)."""
    greedy = sampling.greedy
    return dict(
        do_sample=not greedy,
        num_beams=1,
        num_return_sequences=sampling.n,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=0,
        # Greedy: leave the warpers unset (transformers' neutral defaults; it warns about set ones).
        temperature=None if greedy else float(sampling.temperature),
        top_k=None if greedy else (0 if sampling.top_k <= 0 else int(sampling.top_k)),
        top_p=None if greedy else float(sampling.top_p),
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=[int(t) for t in stop_token_ids],
        pad_token_id=int(pad_token_id),
        output_logits=True,
        output_scores=False,
        return_dict_in_generate=True,
        use_cache=True,
    )


def completions_from_generate(sequences: torch.Tensor, logits: Sequence[torch.Tensor], prompt_ids: Sequence[int],
                              *, stop_token_ids: Sequence[int], max_new_tokens: int, temperature: float,
                              decode) -> list[Completion]:
    """Rows of ``generate``'s output -> ``Completion``s (pure; ``decode(ids) -> str``).

    ``sequences`` is [rows, prompt + T], ``logits`` T raw-logit tensors [rows, vocab].
    """
    prompt_len = len(prompt_ids)
    steps = len(logits)
    if steps:
        logp = torch.log_softmax(torch.stack([l.float() for l in logits], dim=1) / temperature, dim=-1)  # [rows, T, V]
    out = []
    for row in range(sequences.shape[0]):
        generated = sequences[row, prompt_len:prompt_len + steps].tolist()
        tokens, reason = trim_at_stop(generated, stop_token_ids, max_new_tokens)
        if tokens:
            index = torch.tensor(tokens, dtype=torch.long).unsqueeze(-1)
            values = logp[row, : len(tokens)].gather(-1, index).squeeze(-1).tolist()
        else:
            values = []
        out.append(Completion(tuple(int(t) for t in prompt_ids), tuple(tokens), decode(tokens), tuple(values), reason))
    return out


class HFRolloutEngine:
    """``RolloutEngine`` on transformers. ``device`` defaults to CUDA when available, else CPU."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        device: Optional[str | torch.device] = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        processor=None,
    ):
        from transformers import AutoConfig, GenerationConfig

        from ..models.families import transformers_class

        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        config = AutoConfig.from_pretrained(self.checkpoint_dir)
        # The family by model_type (Qwen2.5-VL or Qwen2-VL); another model_type is refused by name.
        with torch.device(self.device):
            model = transformers_class(config.model_type, "model")._from_config(
                config, attn_implementation=attn_implementation, dtype=dtype
            )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor if processor is not None else load_processor(self.checkpoint_dir)
        self.tokenizer = self.processor.tokenizer
        self.stop_token_ids = checkpoint_stop_token_ids(self.checkpoint_dir, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.stop_token_ids[0])
        # A clean generation config: nothing inherited from a Hub generation_config.json.
        self.model.generation_config = GenerationConfig(eos_token_id=list(self.stop_token_ids), pad_token_id=self.pad_token_id)
        self.state = EngineState()
        self.calls = 0
        self._sleep_level = 0
        self._saved_buffers: dict[str, torch.Tensor] = {}
        self._index_parameters()

    # -- weights ------------------------------------------------------------------------------
    def _index_parameters(self) -> None:
        self._targets = dict(self.model.state_dict(keep_vars=True))
        self._alias: dict[str, str] = {}
        for key in self._targets:
            self._alias[key] = key
            self._alias.setdefault(hub_name(key), key)
        self._pending = {name for name, _ in self.model.named_parameters()}

    def _target_key(self, name: str) -> str:
        for candidate in (name, hub_name(name), inmemory_name(name)):
            key = self._alias.get(candidate)
            if key is not None:
                return key
        raise KeyError(f"update_weights: {name!r} is not a tensor of {type(self.model).__name__}")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each ``(hf_name, tensor)`` into the model (either HF naming; dtype/device converted).

        Unknown names and shape mismatches raise. Once every parameter has been loaded (tied
        ``lm_head`` included through the embedding) the engine may generate.
        """
        if "weights" in self.state.asleep:
            raise RuntimeError("update_weights while the weights are asleep; call wake_up(tags=['weights']) first")
        with torch.no_grad():
            for name, tensor in named_tensors:
                key = self._target_key(name)
                target = self._targets[key]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
                target.copy_(tensor)
                self._pending.discard(key)
        if not self._pending:
            self.state.weights_stale = False

    def load_checkpoint_weights(self) -> None:
        """Convenience for demos: stream the checkpoint's own safetensors through ``update_weights``."""
        from ..checkpoint.safetensors_io import open_hf_checkpoint

        with open_hf_checkpoint(self.checkpoint_dir) as reader:
            self.update_weights((k, reader[k]) for k in reader.keys())

    @property
    def missing_weights(self) -> list[str]:
        """Parameters not loaded since construction / the last level-2 sleep."""
        return sorted(self._pending)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 first_index: int = 0) -> list[list[Completion]]:
        """``first_index``: the seed index of ``requests[0]`` (a share of a larger request list)."""
        from transformers import GenerationConfig

        if self._pending and "weights" not in self.state.asleep:
            missing = self.missing_weights
            raise RuntimeError(f"{len(missing)} parameters were never loaded (e.g. {missing[:3]}); call update_weights()")
        self.state.require_ready()
        call, self.calls = self.calls, self.calls + 1
        stops = merged_stop_token_ids(self.stop_token_ids, sampling.stop_token_ids)
        generation_config = GenerationConfig(**hf_generation_kwargs(sampling, stops, self.pad_token_id))
        devices = [self.device] if self.device.type == "cuda" else []
        results = []
        for i, request in enumerate(requests):
            enc = self.processor(text=[request.prompt], images=list(request.images) or None, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            prompt_ids = enc["input_ids"][0].tolist()
            seed = request_seed(sampling.seed, call, first_index + i, sampling.n)
            with torch.random.fork_rng(devices=devices), torch.no_grad(), cpu.suspended():
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(**enc, generation_config=generation_config)
            results.append(completions_from_generate(
                out.sequences.cpu(), [l.cpu() for l in out.logits], prompt_ids, stop_token_ids=stops,
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.logprob_temperature,
                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            ))
        return results

    # -- memory -------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights offloaded to CPU (kept); level 2: weights discarded (reload needed)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.state.asleep:
            return
        if level == 2:
            self._saved_buffers = {name: b.detach().to("cpu", copy=True) for name, b in self.model.named_buffers()}
            self.model.to("meta")
            self.state.weights_stale = True
        elif self.device.type != "cpu":
            self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._sleep_level = level
        self.state.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = self.state.check_tags(tags)
        if "weights" in tags and "weights" in self.state.asleep:
            if self._sleep_level == 2:
                self.model.to_empty(device=self.device)
                self.model.tie_weights()
                with torch.no_grad():
                    for name, buffer in self.model.named_buffers():
                        if name in self._saved_buffers:
                            buffer.copy_(self._saved_buffers[name])
                self._saved_buffers = {}
                self._index_parameters()
            elif self.device.type != "cpu":
                self.model.to(self.device)
            self.state.asleep.discard("weights")
        if "kv_cache" in tags:
            self.state.asleep.discard("kv_cache")
        if not self.state.asleep:
            self._sleep_level = 0

    def shutdown(self) -> None:
        """Nothing outlives the model object here (no engine core, no process groups)."""
