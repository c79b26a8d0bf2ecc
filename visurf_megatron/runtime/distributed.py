"""Process-group and model-parallel set-up from torchrun or Slurm environments.

The model code never looks at the launcher: it receives process groups from megatron's
``parallel_state``, which this module initialises.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from . import cpu


class DistributedEnvError(RuntimeError):
    """The launch environment does not describe a complete distributed world."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[003-005,010],cpu1`` -> ``gpu003``.

    Equivalent to the head of ``scontrol show hostnames``, which is not available everywhere.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistributedEnvError("SLURM_NODELIST is empty")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise DistributedEnvError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise DistributedEnvError(f"{key}={env[key]!r} is not an integer") from exc


def read_dist_env(env: Mapping[str, str] | None = None, default_port: int = 29500) -> DistEnv:
    """Read the world description: torchrun variables first, then Slurm, else a single process.

    A partial description (some variables set, others missing) is an error naming what is missing,
    because silently falling back to one process would train on a fraction of the cluster.
    """
    env = os.environ if env is None else env
    torchrun_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    present = [k for k in torchrun_keys if k in env]
    if present:
        missing = [k for k in torchrun_keys if k not in env]
        if missing:
            raise DistributedEnvError(
                f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing"
            )
        return DistEnv(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_env(env, "MASTER_PORT"),
            source="torchrun",
        )
    slurm_keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST")
    present = [k for k in slurm_keys if k in env]
    if present:
        missing = [k for k in slurm_keys if k not in env]
        if missing:
            raise DistributedEnvError(
                f"incomplete Slurm environment: {', '.join(present)} set but {', '.join(missing)} missing"
            )
        return DistEnv(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=_int_env(env, "SLURM_LOCALID"),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_NODELIST"]),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port,
            source="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", default_port, "single")


def process_group_backend(cuda: bool) -> str:
    """The default group's backend: a device map, so CPU tensors always have a backend.

    With CUDA, ``cpu:gloo,cuda:nccl``: CUDA tensors go over NCCL, and a CPU tensor handed to a
    collective (a count, a flag, an object list's sizes) goes over gloo instead of failing with "No
    backend type associated with device type cpu". megatron creates its groups with
    ``backend=None``, which torch resolves to the default group's backend string, so every
    model-parallel group carries both. Without CUDA plain ``gloo`` (every tensor is a CPU one; the
    device-typed ``cpu:gloo`` would leave groups without a default backend type once a backend
    plugin is registered, which torch 2.13 warns about at every teardown).
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(env: Mapping[str, str] | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise ``torch.distributed`` (see ``process_group_backend``) and the CPU shim if needed."""
    denv = read_dist_env(env)
    if not 0 <= denv.rank < denv.world_size:
        raise DistributedEnvError(f"rank {denv.rank} outside world of size {denv.world_size}")
    cpu.activate()
    if dist.is_initialized():
        return denv
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=process_group_backend(cuda),
        init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return denv


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_model_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    seed: int = 1234,
) -> None:
    """Build megatron's parallel groups and seed every RNG deterministically.

    ``sequence_parallel`` is validated here (it needs tp > 1 to mean anything) but lives in the
    model's TransformerConfig; the groups are the same either way.
    """
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(f"tp={tp} x pp={pp} does not divide world size {world}")
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(f"virtual pipeline size {vpp} needs pp >= 2 and vpp >= 1")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tp > 1")
    release_model_parallel()
    before = set(_subgroups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    _MODEL_PARALLEL_GROUPS[:] = [g for g in _subgroups() if g not in before]
    # Same seed on every rank for replicated state; megatron offsets the TP stream by rank.
    seed_everything(seed)
    if cpu.is_active():
        # megatron's seeding then fills our CPU tracker with its own per-rank offsets; its
        # torch.cuda.manual_seed call is only queued by torch when CUDA is absent.
        cpu.install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# The process groups megatron made at the last ``setup_model_parallel`` in this process.
_MODEL_PARALLEL_GROUPS: list = []


def _subgroups() -> list:
    """Every live process group but the default one. torch has no public listing; its registry is
    the one place that knows them all."""
    from torch.distributed import distributed_c10d

    return [g for g in distributed_c10d._world.pg_map if g is not dist.GroupMember.WORLD]


def release_model_parallel() -> None:
    """Forget megatron's parallel state and destroy the process groups it made. megatron's own
    ``destroy_model_parallel`` only drops its references: torch keeps every group registered, each
    gloo group with its own TCP threads, so a process that builds trainer after trainer (the study
    runs 24 in one world) gathered hundreds of threads, and each run was slower than the last.
    Local to each rank, not a collective."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    live = set(_subgroups()) if dist.is_initialized() else set()
    for group in _MODEL_PARALLEL_GROUPS:
        if group in live:
            dist.destroy_process_group(group)
    _MODEL_PARALLEL_GROUPS.clear()


def teardown() -> None:
    release_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
