"""HF <-> Megatron checkpoint conversion, run on every rank of a tp*pp world.

Both directions validate before writing, write into a hidden temporary directory beside the output
and move it into place at the end, so an interrupted run never leaves a half-written output.
The CLIs in ``checkpoint_converters/`` are thin wrappers around ``hf_to_megatron`` and
``megatron_to_hf`` (and ``launch``, which spawns a local gloo world when not run under torchrun/srun).
"""
from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from visurf_megatron.runtime.spawn import freeze_gc

from . import export
from .hf_writer import ShardPlan, SlotWriter, commit_output, parse_size, prepare_output
from .hf_import import StreamedHFParams, check_hf_tensors
from .mapping import hub_name
from .transforms import MappingContext
from .megatron_io import (
    ASSETS_DIR, DTYPES, ParameterLoader, build_model, copy_hf_assets, read_meta, resolve_checkpoint_dir, save_model,
    write_meta,
)
from .safetensors_io import open_hf_checkpoint


class ConversionError(RuntimeError):
    """A conversion refused to run or failed; the message says why."""


def _on_all_ranks(step: Callable[[], Any], what: str) -> Any:
    """Run ``step`` everywhere; if it fails on any rank, raise the same error on every rank.

    Without this, a rank that fails (say, a tensor missing from its pipeline stage) would leave the
    others waiting forever in the next collective.
    """
    error = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error, result = f"{type(exc).__name__}: {exc}", None
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise ConversionError(f"{what} failed on rank {rank}: {message}")
    return result


def _to_collective_device(model):
    # With CUDA the default group is cpu:gloo,cuda:nccl (runtime.distributed.process_group_backend):
    # the model's tensors go over nccl, on the GPU; gloo works on the CPU copies megatron built.
    return model.cuda() if torch.cuda.is_available() else model


def _import_megatron_deferring_compile() -> None:
    """Import megatron-core with its ``torch.compile`` decorators compiling on first call, not now.

    megatron-core 0.16.1 decorates its fused kernels with ``torch.compile`` at import (``jit_fuser``),
    which imports dynamo and inductor: about 2 s per rank, every conversion. A converter never calls
    those kernels; if anything in this process does, the wrapper compiles it then, as usual.
    Also imports the model that ``build_model`` needs, with the cyclic GC paused (see below).
    """
    import sys

    if "megatron.core" in sys.modules:
        return
    real_compile = torch.compile

    def deferred_compile(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def run(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)

        return run

    # Imports only create objects that live until exit, yet with the cyclic GC on they trigger
    # hundreds of full collections over a growing heap (~0.35 s for megatron). Pause it, then
    # freeze what was imported so later collections (and the ones at interpreter exit) skip it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        torch.compile = deferred_compile
        try:
            importlib.import_module("megatron.core")  # binds megatron.core.jit.jit_fuser to deferred_compile
        finally:
            torch.compile = real_compile
        importlib.import_module("visurf_megatron.models.qwen2_5_vl.model")  # build_model's
    finally:
        if gc_was_enabled:
            gc.enable()
    freeze_gc()


def _release_freed_tensors_to_the_os() -> None:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping.

    Converters allocate and free tensor after tensor. glibc's adaptive threshold (raised to the
    size of each mapping freed, up to 32 MiB) sends later tensors of that size to the heap, where
    fragmentation kept ~0.4 GiB resident per rank in the 7B-width benchmark. No-op off glibc.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _hf_dtype(config: dict) -> Optional[torch.dtype]:
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def _broadcast_path(path: Optional[Path]) -> Path:
    holder = [str(path) if path is not None else None]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int, pp: int, dtype: Optional[str] = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Convert an HF Qwen2.5-VL directory into a megatron dist checkpoint (collective over tp*pp ranks)."""
    from visurf_megatron.runtime import setup_model_parallel

    _import_megatron_deferring_compile()
    _release_freed_tensors_to_the_os()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != tp * pp:
        raise ConversionError(f"run with tp*pp = {tp * pp} ranks (got a world of {world})")

    def validate():
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"{hf_dir} has no config.json")
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
        config = json.loads((hf_dir / "config.json").read_text())
        torch_dtype = DTYPES[dtype] if dtype else (_hf_dtype(config) or torch.float32)
        setup_model_parallel(tp=tp, pp=pp)
        model, _ = build_model(config, tp, pp, torch_dtype)
        return config, torch_dtype, _to_collective_device(model)

    config, torch_dtype, model = _on_all_ranks(validate, "validation")

    reader = _on_all_ranks(lambda: open_hf_checkpoint(hf_dir), "opening the HF checkpoint")
    try:
        # Everything is checked from the headers before anything is written; the tensors are then
        # read parameter by parameter as the save asks for them (hf_import.StreamedHFParams).
        reads = _on_all_ranks(lambda: check_hf_tensors([model], reader), "reading the HF checkpoint")
        used = sorted({h for read in reads for h in read.resolved.hf_names})
        all_used = [None] * world
        dist.all_gather_object(all_used, used)
        available = {hub_name(k) for k in reader.keys()}
        unexpected = sorted(available - set().union(*map(set, all_used)))
        if unexpected:
            raise ConversionError(f"{len(unexpected)} unexpected tensors in {hf_dir} (not part of the model): "
                                  + ", ".join(unexpected[:20]))
        temp = _broadcast_path(_on_all_ranks(lambda: prepare_output(out_dir, overwrite) if rank == 0 else None,
                                             "preparing the output"))
        dist.barrier()
        stream = StreamedHFParams(reads, reader, MappingContext.from_extras(model.extras))
        # Published by an atomic rename, so no fsync: a crash means a rerun.
        _on_all_ranks(lambda: save_model([model], temp, sync_files=False, stream=stream), "writing the checkpoint")
    finally:
        reader.close()
    if rank == 0:
        write_meta(temp, config, torch_dtype, tp, pp, source=str(hf_dir.resolve()))
        copy_hf_assets(hf_dir, temp / ASSETS_DIR)
        shutil.copy2(hf_dir / "config.json", temp / ASSETS_DIR / "config.json")
    dist.barrier()
    if rank == 0:
        commit_output(temp, out_dir)
    dist.barrier()
    return {"out_dir": str(out_dir), "tensors": len(available), "dtype": str(torch_dtype), "tp": tp, "pp": pp}


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, hf_template: Optional[str | Path] = None,
                   dtype: Optional[str] = None, max_shard_size: str = "5GB", overwrite: bool = False,
                   tp: int = 1, pp: int = 1, progress: bool = True) -> dict:
    """Load a dist checkpoint under (tp, pp) and write it as an HF directory, every rank its parts.

    The model is built (untouched memory) only for its layout: parameters are read a group at a
    time, written in place into the planned safetensors files and freed.
    """
    from visurf_megatron.runtime import setup_model_parallel

    _import_megatron_deferring_compile()
    _release_freed_tensors_to_the_os()
    out_dir = Path(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != tp * pp:
        raise ConversionError(f"run with tp*pp = {tp * pp} ranks (got a world of {world})")

    def validate():
        ckpt = resolve_checkpoint_dir(megatron_dir)
        meta = read_meta(ckpt)
        assets = Path(hf_template) if hf_template else ckpt / ASSETS_DIR
        if not (assets / "tokenizer_config.json").is_file() and not (assets / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer files in {assets}; pass --hf-template with the original HF directory")
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
        parse_size(max_shard_size)
        setup_model_parallel(tp=tp, pp=pp)
        # Built on the CPU even with a GPU present: only files are written, no tensor collectives.
        model, _ = build_model(meta["hf_config"], tp, pp, DTYPES[meta["dtype"]],
                               config_overrides={"use_cpu_initialization": True})
        return ckpt, meta, assets, model

    ckpt, meta, assets, model = _on_all_ranks(validate, "validation")
    # Each rank loads its parameters a group at a time just before writing its parts of them, and
    # frees them once written, so no rank ever holds its whole shard (ParameterLoader, export.py).
    loader = _on_all_ranks(lambda: _checked_loader(model, ckpt), f"reading {ckpt}")
    out_dtype = DTYPES[dtype] if dtype else DTYPES[meta["dtype"]]
    plan = ShardPlan.build(export.hf_layout([model]), parse_size(max_shard_size), out_dtype)

    def prepare():
        temp = prepare_output(out_dir, overwrite)
        plan.create_files(temp)
        return temp

    temp = _broadcast_path(_on_all_ranks(lambda: prepare() if rank == 0 else None, "preparing the output"))

    def write():
        writer = SlotWriter(temp, plan)
        try:
            return export.write_own_parts([model], writer, fetch=loader.fetch, release=loader.release,
                                          progress=lambda it: _progress(it, progress and rank == 0, desc="export",
                                                                        unit="tensor"))
        finally:
            writer.close()

    written = _on_all_ranks(write, "exporting")
    counts = [None] * world
    dist.all_gather_object(counts, written)
    if sum(counts) != plan.total_bytes:  # a mapping that misses or repeats bytes must not go unseen
        raise ConversionError(f"the ranks wrote {sum(counts)} bytes, the checkpoint has {plan.total_bytes}")

    def finish():
        if rank != 0:
            return []
        files = plan.write_index(temp)
        config = dict(meta["hf_config"])
        config["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[out_dtype]
        config.pop("torch_dtype", None)
        (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_hf_assets(assets, temp)
        return files

    files = _on_all_ranks(finish, "exporting")
    if rank == 0:
        commit_output(temp, out_dir)
    dist.barrier()
    return {"out_dir": str(out_dir), "tensors": len(plan.slots), "files": files, "dtype": str(out_dtype)}


def _checked_loader(model, ckpt: Path) -> ParameterLoader:
    loader = ParameterLoader([model], ckpt, schedule=export.senders([model]))
    loader.check()
    return loader


def _rank_entry(fn_name: str, kwargs: dict) -> dict:
    return {"hf_to_megatron": hf_to_megatron, "megatron_to_hf": megatron_to_hf}[fn_name](**kwargs)


def local_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float, **kwargs: Any) -> list:
    """``fn`` on a local gloo world of ``world_size`` ranks, forked from here where that is safe.

    Forked ranks start with torch and megatron imported once, here, instead of each rank importing
    them again (~2 s per conversion on 2 cores); elsewhere (CUDA, threads) ranks are spawned.
    """
    from visurf_megatron.runtime.spawn import fork_is_safe, run_world

    start_method = "spawn"
    if fork_is_safe():
        _import_megatron_deferring_compile()
        start_method = "fork"
    return run_world(fn, world_size, *args, timeout_s=timeout_s, start_method=start_method, **kwargs)


def launch(fn_name: str, world_size: int, kwargs: dict, timeout_s: float = 7 * 24 * 3600) -> dict:
    """Run a conversion on every rank: in-process under torchrun/srun, else in a local gloo world."""
    from visurf_megatron.runtime import init_distributed, teardown
    from visurf_megatron.runtime.spawn import RankFailure

    if any(k in os.environ for k in ("RANK", "SLURM_PROCID")):
        init_distributed()
        try:
            return _rank_entry(fn_name, kwargs)
        finally:
            teardown()
    try:
        return local_world(_rank_entry, world_size, fn_name, kwargs, timeout_s=timeout_s)[0]
    except RankFailure as exc:
        # The last line of the failing rank's traceback is the message a user needs.
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        raise ConversionError(last.split("ConversionError: ", 1)[-1]) from None
