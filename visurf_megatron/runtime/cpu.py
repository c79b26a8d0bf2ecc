"""Let megatron-core 0.16.1 run on a machine without CUDA (gloo process groups, CPU tensors).

This is the only place in the project that bends megatron-core's hard-coded CUDA assumptions, and
it is active only when ``torch.cuda.is_available()`` is False: ``activate()`` is a no-op on a GPU
machine, so production runs never see it. Config switches come first and need no patch:
``use_cpu_initialization=True``, the local (pure PyTorch) layer spec, ``batch_p2p_sync=False``.

What remains, call site by call site (megatron-core 0.16.1), and how it is handled:

* ``torch.cuda.current_device()`` used as ``device=`` in ~50 places (tensor_parallel/layers.py,
  mappings.py, pipeline_parallel/p2p_communication.py, distributed/param_and_grad_buffer.py, ...):
  patched to return the CPU device. (Returning 0 would not do: torch rejects ``device=0`` without
  CUDA before any mode sees the call, and several of these sites run inside autograd backward,
  where a torch-function mode entered around ``backward()`` is not active.)
* literal ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")``: pipeline_parallel/schedules.py token
  counting (``total_num_tokens``), transformer/utils.py causal-mask helpers, optimizer/clip_grads.py
  norms, optimizer/optimizer.py ``found_inf``/``_scale_one``, optimizer/grad_scaler.py,
  dist_checkpointing/strategies/state_dict_saver.py: the torch-function mode rewrites any CUDA device
  argument of a torch call to CPU.
* ``param.type() == 'torch.cuda.FloatTensor'`` in optimizer/optimizer.py (Float16 optimizer),
  optimizer/distrib_optimizer.py and optimizer/clip_grads.py: the mode answers a zero-argument
  ``Tensor.type()`` of a CPU tensor with the CUDA type name those branches dispatch on.
* ``torch.cuda.synchronize`` / ``empty_cache`` (checkpoint writer, timers, p2p) -> no-ops;
  ``torch.cuda.device_count`` -> 0 stays as torch reports it.
* tensor_parallel/random.py keeps CUDA RNG states per tracker name: ``install_cpu_rng_tracker``
  puts in a tracker with the same interface that forks the CPU default generator instead.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE_MODE: "_CudaCallsToCpu | None" = None
_ORIGINALS: dict[str, Any] = {}


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # torch reads a bare int device as a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")


class _CudaCallsToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            type_name = func(*args)
            if args[0].device.type == "cpu" and type_name.startswith("torch."):
                return "torch.cuda." + type_name[len("torch."):]
            return type_name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if name == "to" and len(args) >= 2 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that forks the CPU default generator.

    Megatron forks a named RNG state for tensor-parallel regions (dropout inside TP, weight init
    without ``use_cpu_initialization``). Same bookkeeping and errors as the CUDA tracker.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker() -> CpuRNGStatesTracker:
    """Make ``get_cuda_rng_tracker()`` return a fresh CPU tracker (idempotent per call)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def _noop(*args, **kwargs):
    return None


def _cpu_device() -> torch.device:
    return _CPU


def activate() -> bool:
    """Install the CPU redirections for this process. Returns whether anything was installed.

    Inert (returns False, touches nothing) when CUDA is available.
    """
    global _ACTIVE_MODE
    if cuda_present():
        return False
    if _ACTIVE_MODE is not None:
        return True
    for attr, replacement in (
        ("current_device", _cpu_device),
        ("synchronize", _noop),
        ("empty_cache", _noop),
    ):
        _ORIGINALS[attr] = getattr(torch.cuda, attr)
        setattr(torch.cuda, attr, replacement)
    _ACTIVE_MODE = _CudaCallsToCpu()
    _ACTIVE_MODE.__enter__()
    log.debug("CPU shim for megatron-core active")
    return True


def deactivate() -> None:
    """Undo ``activate`` (used by tests; a training process keeps the shim for its lifetime)."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is None:
        return
    _ACTIVE_MODE.__exit__(None, None, None)
    _ACTIVE_MODE = None
    for attr, original in _ORIGINALS.items():
        setattr(torch.cuda, attr, original)
    _ORIGINALS.clear()


def is_active() -> bool:
    return _ACTIVE_MODE is not None


@contextlib.contextmanager
def suspended():
    """Run the block without the torch-function mode, for code that never names CUDA: the rollout
    engines' generation (vLLM's CPU build, transformers' ``generate``). The mode's Python hook sits in
    front of every torch call; in token-by-token decoding (thousands of small ops per token) it cost
    ~20 % of the generation time, ~7 % of a study step.

    Only when the mode is the innermost one (a mode pushed later stays untouched); a no-op where the
    shim is inactive (GPU machines)."""
    mode = _ACTIVE_MODE
    depth = torch._C._len_torch_function_stack()
    if mode is None or depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()
