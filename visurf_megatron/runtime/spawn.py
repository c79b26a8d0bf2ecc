"""Spawn a local world of N ranks (gloo on CPU), run one function on every rank, collect results.

Used by the distributed tests and by the benchmarks. Each rank runs in its own process session so a
timeout can kill the rank *and* anything it started (megatron's checkpoint writers, for instance,
which otherwise keep a parent waiting forever).
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable


class RankFailure(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


class WorldTimeout(RuntimeError):
    """The world did not finish in time; every rank was killed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_world() -> None:
    """A torch.distributed world of this process alone, described in the environment as torchrun
    would (vLLM's external_launcher runs inside an initialised world and reads it there), on a free
    port unless MASTER_PORT is set. Nothing happens inside an existing world."""
    import torch

    if torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def fork_is_safe() -> bool:
    """Whether ranks may be forked from this process: Linux, a single thread (a lock held by
    another thread would stay locked in the child forever) and no CUDA here (CUDA cannot be used
    again in a forked child; on GPU machines ranks are spawned or come from torchrun/srun)."""
    if sys.platform != "linux" or threading.active_count() > 1:
        return False
    import torch

    return not torch.cuda.is_initialized() and not torch.cuda.is_available()


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the launching process dies (Ctrl-C, kill), so no orphan rank
    goes on to finish (and, say, commit a half-cancelled conversion)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_main(rank, world_size, port, fn, args, kwargs, results, env):
    os.setsid()
    _die_with_parent()
    os.environ.update(env)
    if env.get("PYTHONWARNINGS") == "ignore":
        import warnings

        warnings.simplefilter("ignore")
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from visurf_megatron.runtime import init_distributed, teardown

        init_distributed()
        try:
            value = fn(*args, **kwargs)
        finally:
            teardown()
        # Plain pickle: torch's queue reducers pass tensors through shared memory handles that die
        # with this process, which may exit before the parent reads the queue.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    # Interpreter shutdown runs full cyclic-GC passes over everything torch, megatron and
    # transformers imported (~400k objects): ~1 s per rank that the parent spends in join().
    # Frozen objects are skipped by those passes; atexit handlers, stream flushing and the queue's
    # feeder thread still run as usual (only __del__ of objects kept alive by a cycle is not run).
    freeze_gc()


def freeze_gc() -> bool:
    """``gc.freeze()`` (see its callers for why) unless triton's nanobind extension is loaded
    (megatron-core imports triton where it is installed, and vLLM needs it): nanobind then reports
    every object it still sees at exit as leaked, a page per process. Returns whether it froze."""
    if "triton._C.libtriton" in sys.modules:
        return False
    gc.freeze()
    return True


def _kill(procs) -> None:
    for proc in procs:
        if proc.pid is None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        proc.join(timeout=5)


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    start_method: str = "spawn",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results.

    With ``spawn`` (the default) ``fn`` must be importable by name (module-level) and every rank
    imports what it needs itself; ``fork`` (see ``fork_is_safe``) starts ranks with this process's
    modules already imported. The first failing rank's traceback is raised as ``RankFailure``
    after all ranks are stopped.
    """
    if start_method == "fork" and not fork_is_safe():
        raise ValueError("fork is not safe in this process (CUDA, threads or no fork); use spawn")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    rank_env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, args, kwargs, results, rank_env),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorldTimeout(
                    f"world of {world_size} ranks running {getattr(fn, '__name__', fn)} "
                    f"exceeded {timeout_s:.0f}s; finished ranks: {sorted(collected)}"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in collected]
                if dead:
                    raise RankFailure(
                        f"rank(s) {dead} died with exit code(s) {[procs[i].exitcode for i in dead]} "
                        "before reporting"
                    )
                continue
            if not ok:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            collected[rank] = pickle.loads(value)
    finally:
        if len(collected) < world_size:
            _kill(procs)
        else:
            for proc in procs:
                proc.join(timeout=30)
            _kill([p for p in procs if p.is_alive()])
    return [collected[r] for r in range(world_size)]
