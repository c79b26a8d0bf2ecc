"""Rollout engine on vLLM in SPMD mode, inside the training processes (GPU only; vLLM 0.33).

Every training rank builds one ``VLLMRolloutEngine`` (a collective: vLLM creates its own process
groups over the already-initialised ``torch.distributed`` world). Layout, with ``W`` ranks and rollout
tensor parallel size ``t`` (independent of the training TP/PP):

* ``distributed_executor_backend="external_launcher"``: one vLLM worker per process, in-process engine
  core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which external_launcher requires; set here).
* vLLM groups ranks ``[k*t, ..., k*t + t - 1]`` into rollout TP group ``k`` (its external data-parallel
  replica, ``dp_rank = rank // t``). All ranks of one group must call ``generate`` with identical
  requests and sampling; different groups may (and should) receive different prompts.
* ``load_format="dummy"``: no checkpoint weights are read; the trainer streams its own weights in
  through ``update_weights`` (the ``(hf_name, tensor)`` stream of ``sync.export_hf_weights``) which
  calls the model's ``load_weights`` on this rank's worker (``LLM.collective_rpc`` with a callable,
  run in-process, so the stream is consumed lazily, bucket by bucket). Every rank holds the full
  tensors; vLLM's weight loaders slice this rank's TP shard.
* ``enable_sleep_mode=True``: ``sleep()`` frees the KV cache and offloads (level 1) or discards
  (level 2, default: the weights are re-synced every step anyway) the weights;
  ``wake_up(tags=["weights"])`` then ``update_weights`` then ``wake_up(tags=["kv_cache"])``.
* ``logprobs_mode="processed_logprobs"`` and ``SamplingParams(logprobs=0)``: the log-prob of each
  sampled token after temperature scaling (and top-k / top-p masking when those are on), i.e.
  ``log_softmax(logits / T)`` with them off, the trainer's convention (``base`` module doc).

Importing this module needs no vLLM (it is imported lazily in the class). The pure helpers
(``llm_kwargs``, ``sampling_params_kwargs``, ``vllm_prompt``, ``completions_from_request_output``) take
and return plain values and are tested on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .base import Completion, EngineState, RolloutRequest, SamplingConfig, request_seed, trim_at_stop
from .processor import checkpoint_stop_token_ids, merged_stop_token_ids


def llm_kwargs(
    checkpoint_dir: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    max_model_len: Optional[int] = None,
    max_images_per_prompt: int = 1,
    enforce_eager: bool = False,
    enable_prefix_caching: bool = True,
    mm_processor_kwargs: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for an SPMD rollout engine (pure). ``dtype`` is a vLLM dtype
    name or a ``torch.dtype`` (given by name)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    kwargs: dict[str, Any] = dict(
        model=str(checkpoint_dir),
        tokenizer=str(checkpoint_dir),
        tensor_parallel_size=int(tensor_parallel_size),
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=True,
        load_format="dummy",
        gpu_memory_utilization=float(gpu_memory_utilization),
        dtype=dtype,
        seed=int(seed),
        logprobs_mode="processed_logprobs",
        # Sampling defaults come from our SamplingConfig only, never from a Hub generation_config.json.
        generation_config="vllm",
        limit_mm_per_prompt={"image": int(max_images_per_prompt), "video": 0},
        enforce_eager=bool(enforce_eager),
        enable_prefix_caching=bool(enable_prefix_caching),
        trust_remote_code=False,
        disable_log_stats=True,
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    if mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    if extra:
        kwargs.update(extra)
    return kwargs


def sampling_params_kwargs(sampling: SamplingConfig, stop_token_ids: Sequence[int], seed: Optional[int]) -> dict[str, Any]:
    """Keyword arguments of one request's ``vllm.SamplingParams`` (pure). ``seed`` is the request seed
    (vLLM gives sample ``j`` of ``n`` the seed ``seed + j``)."""
    greedy = sampling.greedy
    return dict(
        n=sampling.n,
        temperature=0.0 if greedy else float(sampling.temperature),
        top_p=1.0 if greedy else float(sampling.top_p),
        top_k=0 if greedy or sampling.top_k <= 0 else int(sampling.top_k),  # 0: all tokens
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        max_tokens=sampling.max_new_tokens,
        min_tokens=0,
        stop_token_ids=[int(t) for t in stop_token_ids],
        ignore_eos=False,
        seed=seed,
        logprobs=0,  # the sampled token's log-prob only
        skip_special_tokens=True,
    )


def vllm_prompt(request: RolloutRequest) -> dict[str, Any]:
    """A vLLM multimodal prompt: ``{"prompt": text, "multi_modal_data": {"image": [PIL, ...]}}``."""
    prompt: dict[str, Any] = {"prompt": request.prompt}
    if request.images:
        prompt["multi_modal_data"] = {"image": list(request.images)}
    return prompt


def _sampled_logprob(entry: Any, token: int) -> float:
    """The log-prob of ``token`` in one position of vLLM's ``logprobs`` (dict token -> Logprob)."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


def completions_from_request_output(output: Any, *, stop_token_ids: Sequence[int], max_new_tokens: int) -> list[Completion]:
    """``vllm.RequestOutput`` (duck-typed: ``prompt_token_ids``, ``outputs[*].index / token_ids / text /
    logprobs / finish_reason``) -> ``Completion``s in sample order (pure)."""
    prompt_ids = tuple(int(t) for t in (output.prompt_token_ids or ()))
    out = []
    for co in sorted(output.outputs, key=lambda c: c.index):
        if co.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with {co.finish_reason!r} (expected 'stop' or 'length')")
        token_ids = [int(t) for t in co.token_ids]
        if co.logprobs is None or len(co.logprobs) < len(token_ids):
            raise RuntimeError("vLLM returned no per-token log-probs; SamplingParams(logprobs=0) is required")
        tokens, reason = trim_at_stop(token_ids, stop_token_ids, max_new_tokens)
        if co.finish_reason == "stop":
            reason = "stop"  # a stop id vLLM did not emit into token_ids still ended the sequence
        logprobs = tuple(_sampled_logprob(co.logprobs[i], t) for i, t in enumerate(tokens))
        out.append(Completion(prompt_ids, tuple(tokens), co.text, logprobs, reason))
    return out


def _load_weights_on_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs on this rank's vLLM worker (``collective_rpc`` callable): ``model.load_weights(stream)``."""
    inner = getattr(worker, "worker", None) or worker
    runner = getattr(inner, "model_runner", None)
    model = runner.model if runner is not None and getattr(runner, "model", None) is not None else inner.get_model()
    loaded = model.load_weights(weights)
    return len(loaded) if loaded is not None else -1


class VLLMRolloutEngine:
    """``RolloutEngine`` on ``vllm.LLM`` (external_launcher SPMD, sleep mode, dummy initial weights).

    Build it on every rank after ``torch.distributed`` is initialised (and after megatron's groups: vLLM
    adds its own). ``sleep_level`` is what ``sleep()`` uses by default.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str | torch.dtype = "bfloat16",
        seed: int = 0,
        max_model_len: Optional[int] = None,
        max_images_per_prompt: int = 1,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        mm_processor_kwargs: Optional[Mapping[str, Any]] = None,
        sleep_level: int = 2,
        extra_llm_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
            raise RuntimeError("external_launcher needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine core)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if world % tensor_parallel_size:
            raise ValueError(f"rollout tensor_parallel_size {tensor_parallel_size} does not divide the world of {world}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        from vllm import LLM  # lazy: the module imports on CPU without vLLM

        self.checkpoint_dir = Path(checkpoint_dir)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.dp_rank, self.dp_size = rank // self.tensor_parallel_size, world // self.tensor_parallel_size
        self.sleep_level = sleep_level
        self.llm = LLM(**llm_kwargs(
            checkpoint_dir, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype, seed=seed, max_model_len=max_model_len, max_images_per_prompt=max_images_per_prompt,
            enforce_eager=enforce_eager, enable_prefix_caching=enable_prefix_caching,
            mm_processor_kwargs=mm_processor_kwargs, extra=extra_llm_kwargs,
        ))
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = checkpoint_stop_token_ids(self.checkpoint_dir, self.tokenizer)
        self.state = EngineState()  # dummy weights: stale until the first update
        self.calls = 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream full HF-named tensors into this rank's vLLM model (``load_weights``); resets the
        prefix cache, whose KV blocks were computed with the old weights."""
        if "weights" in self.state.asleep:
            raise RuntimeError("update_weights while the weights are asleep; call wake_up(tags=['weights']) first")
        self.llm.collective_rpc(_load_weights_on_worker, args=(named_tensors,))
        self.llm.reset_prefix_cache()
        self.state.weights_stale = False

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        self.state.require_ready()
        call, self.calls = self.calls, self.calls + 1
        stops = merged_stop_token_ids(self.stop_token_ids, sampling.stop_token_ids)
        params = [
            SamplingParams(**sampling_params_kwargs(sampling, stops, request_seed(sampling.seed, call, i, sampling.n)))
            for i in range(len(requests))
        ]
        outputs = self.llm.generate([vllm_prompt(r) for r in requests], sampling_params=params, use_tqdm=False)
        return [completions_from_request_output(o, stop_token_ids=stops, max_new_tokens=sampling.max_new_tokens)
                for o in outputs]

    def sleep(self, level: Optional[int] = None) -> None:
        """Free the KV cache and offload (1) or discard (2, default ``sleep_level``) the weights."""
        level = self.sleep_level if level is None else level
        if self.state.asleep:
            return
        self.llm.sleep(level=level)
        self.state.asleep = {"weights", "kv_cache"}
        if level == 2:
            self.state.weights_stale = True

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = [t for t in self.state.check_tags(tags) if t in self.state.asleep]
        if not tags:
            return
        self.llm.wake_up(tags=tags)
        self.state.asleep.difference_update(tags)
