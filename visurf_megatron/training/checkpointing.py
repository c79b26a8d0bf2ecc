"""Training checkpoints: model + optimizer + RNG + trainer state, written atomically, resumed exactly.

Layout of a run's checkpoint root::

    root/iter_0000040/                 megatron dist_checkpointing directory (complete, or absent)
        model.*                        the model under key ``model`` (same as ``megatron_io.save_model``)
        optimizer.*                    megatron optimizer state (distributed: ``dp_reshardable``)
        rank_state (ShardedObject)     per global rank: python/numpy/torch(/CUDA) RNG + megatron tracker
        common.pt                      ``train_state`` (the trainer's dict) and the Adam step
        visurf_meta.json, hf_assets/   so ``checkpoint_converters/megatron_to_hf.py`` reads it as is
    root/latest_checkpointed_iteration.txt     the newest complete iteration
    root/.iter_0000050.partial/        a save in progress (or one killed mid-way: ignored, cleaned)

A save writes into the hidden ``.partial`` directory; rank 0 renames it into place only after every
rank finished writing, then replaces ``latest`` (temporary file + ``os.replace``), then prunes.
A kill at any point leaves ``latest`` naming a complete checkpoint.

Exact resume with torch Adam (no Apex/TE; megatron-core 0.16.1), each point checked by a failing
resume without it: the load-time sharded dict needs a full Adam state (the distributed optimizer
asserts one common ``step``), so a dummy one is created first; loading copies into views of leaf
parameters, so it runs under ``torch.no_grad()``; ``dp_reshardable`` keeps ``step`` as a local
(non-persistent) object and writes the template's dummy step back over the loaded one, so the Adam
step is saved in the common state and restored explicitly; and every RNG (python, numpy, torch,
CUDA, megatron's tracker) is restored per rank.

Resharding on load: the model loads under any TP/PP. With the plain (non-distributed) optimizer
the optimizer state is keyed by model tensors, so it reloads under another TP/PP too (tested:
PP2 -> TP2). The distributed optimizer's ``dp_reshardable`` format follows megatron's internal
buckets: another TP/PP is refused with a clear error; megatron documents DP-only resharding for
it (not tested here). Per-rank RNG states are restored only under the same world size, TP and PP;
otherwise the RNGs keep the seeds set at start-up (logged).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from visurf_megatron.checkpoint.megatron_io import (
    ASSETS_DIR, DTYPES, LATEST_NAME, META_NAME, copy_hf_assets, model_sharded_state_dict, write_meta,
)
from visurf_megatron.checkpoint.mapping import unwrap

log = logging.getLogger(__name__)

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}  # the default fails on CPU
_ITER_RE = re.compile(r"^iter_(\d{7})$")
TRAINING_FORMAT = 1


# ------------------------------------------------------------------------------------------------
# Paths


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def partial_iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".iter_{step:07d}.partial"


def _is_complete(directory: Path) -> bool:
    # megatron writes metadata.json last; visurf_meta.json is written after it; then the rename.
    return (directory / "metadata.json").is_file() and (directory / META_NAME).is_file()


def complete_iterations(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (only complete ones carry the final name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))]
    return sorted(s for s in steps if _is_complete(iteration_dir(root, s)))


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; None when there is no ``latest`` file.

    Should the named directory be gone (a kill while a checkpoint of the same step was being
    replaced), the newest complete one is used instead, with a warning.
    """
    latest = Path(root) / LATEST_NAME
    if not latest.is_file():
        return None
    directory = iteration_dir(root, int(latest.read_text().strip()))
    if _is_complete(directory):
        return directory
    steps = complete_iterations(root)
    if not steps:
        raise FileNotFoundError(f"{latest} names {directory}, which is not a complete checkpoint; "
                                "there is no other")
    log.warning("%s names %s, which is not complete; using %s", latest, directory, iteration_dir(root, steps[-1]))
    return iteration_dir(root, steps[-1])


def _write_latest(root: Path, step: int) -> None:
    temp = root / f".{LATEST_NAME}.tmp"
    with open(temp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, root / LATEST_NAME)


def _commit(root: Path, step: int, temp: Path, keep_last: int) -> None:
    """Rank 0, after every rank wrote ``temp``: rename into place, point ``latest`` at it, prune."""
    final = iteration_dir(root, step)
    if final.exists():  # the same step saved again (e.g. a rerun from an older checkpoint)
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    _write_latest(root, step)
    if keep_last > 0:
        for old_step in complete_iterations(root)[:-keep_last]:
            if old_step != step:
                shutil.rmtree(iteration_dir(root, old_step), ignore_errors=True)
    for stale in root.glob(".iter_*.partial"):  # left by saves that were killed
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Optimizer details (torch Adam fallback when neither Apex nor Transformer Engine is installed)


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [s.optimizer for s in subs if isinstance(getattr(s, "optimizer", None), torch.optim.Optimizer)]


def _adam_step(optimizer) -> Optional[float]:
    """The optimizer's step count (one value for every parameter; None before the first step)."""
    steps, group_steps = set(), set()
    for opt in _torch_optimizers(optimizer):
        steps |= {float(s["step"]) for s in opt.state.values() if "step" in s}
        group_steps |= {float(g["step"]) for g in opt.param_groups if g.get("step") is not None and g["params"]}
    # torch Adam advances the per-parameter steps only; a group-level "step" (left there by megatron's
    # state_dict / load for Apex-style optimizers) goes stale, so it counts only when no state exists.
    steps = steps or group_steps
    if len(steps) > 1:
        raise RuntimeError(f"optimizer steps differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else None


def _init_dummy_state(optimizer) -> None:
    """Give torch Adam a full state (step, moments) so megatron can build the load-time dict."""
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _restore_adam_step(optimizer, step: Optional[float]) -> None:
    for opt in _torch_optimizers(optimizer):
        if step is None:  # saved before the first step: back to an empty state
            opt.state.clear()
            continue
        for state in opt.state.values():
            if "step" in state:
                old = state["step"]
                state["step"] = (torch.tensor(step, dtype=old.dtype, device=old.device)
                                 if isinstance(old, torch.Tensor) else type(old)(step))
        for group in opt.param_groups:
            if "step" in group and group["step"] is not None:
                group["step"] = int(step)


# ------------------------------------------------------------------------------------------------
# RNG and layout


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _rank_object(data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rank_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _sharded_state(opt_state, *, is_loading: bool) -> dict:
    model = model_sharded_state_dict(opt_state.model_chunks)
    state = dict(model)
    state["optimizer"] = opt_state.optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                                 metadata=OPTIMIZER_METADATA)
    return state


# ------------------------------------------------------------------------------------------------
# Save / load


def save_training_checkpoint(root: str | Path, step: int, opt_state, *, train_state: dict, meta: dict,
                             keep_last: int = 2) -> Path:
    """Collective: write ``root/iter_{step:07d}`` atomically and point ``latest`` at it.

    ``train_state``: the trainer's picklable state (identical on all ranks). ``meta``: ``hf_config``
    (the HF config dict), optional ``hf_assets_src`` (an HF directory: tokenizer, processor, config),
    optional ``dtype`` (default: the model's params dtype), anything else JSON-able is recorded.
    """
    from megatron.core import dist_checkpointing

    root, rank = Path(root), dist.get_rank()
    temp = partial_iteration_dir(root, step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)  # a killed save of the same step
        temp.mkdir()
    dist.barrier()
    layout = _layout()
    adam_step = _adam_step(opt_state.optimizer)
    steps = [None] * layout["world"]
    dist.all_gather_object(steps, adam_step)
    known = {s for s in steps if s is not None}
    if len(known) > 1:
        raise RuntimeError(f"optimizer steps differ between ranks: {steps}")
    state = _sharded_state(opt_state, is_loading=False)
    state["rank_state"] = _rank_object({"rng": rng_state(), "layout": layout})
    state["train_state"] = {"format": TRAINING_FORMAT, "step": step, "train_state": train_state,
                            "adam_step": known.pop() if known else None, "layout": layout}
    dist_checkpointing.save(state, str(temp))
    if rank == 0:
        dtype = meta.get("dtype") or unwrap(opt_state.model_chunks[0]).config.params_dtype
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        hf_config = meta["hf_config"]
        if isinstance(hf_config, (str, Path)):  # an HF directory
            hf_config = json.loads((Path(hf_config) / "config.json").read_text())
        extra = {k: v for k, v in meta.items() if k not in ("hf_config", "hf_assets_src", "dtype")}
        write_meta(temp, hf_config, dtype, layout["tp"], layout["pp"], kind="training", step=step,
                   **extra)
        if meta.get("hf_assets_src"):
            src = Path(meta["hf_assets_src"])
            copy_hf_assets(src, temp / ASSETS_DIR)
            if (src / "config.json").is_file():
                shutil.copy2(src / "config.json", temp / ASSETS_DIR / "config.json")
    dist.barrier()
    if rank == 0:
        _commit(root, step, temp, keep_last)
    dist.barrier()
    return iteration_dir(root, step)


def load_training_checkpoint(root: str | Path, opt_state) -> Optional[dict]:
    """Collective: restore model, optimizer, RNG from ``root``'s latest checkpoint; its ``train_state``.

    Returns None (and changes nothing) when ``root`` has no ``latest`` file.
    """
    from megatron.core import dist_checkpointing

    directory = latest_checkpoint(root)
    if directory is None:
        return None
    common = dist_checkpointing.load_common_state_dict(str(directory))["train_state"]
    if common.get("format") != TRAINING_FORMAT:
        raise ValueError(f"{directory}: unsupported training checkpoint format {common.get('format')}")
    saved, now = common["layout"], _layout()
    same_layout = all(saved[k] == now[k] for k in ("world", "tp", "pp"))
    ddp_config = getattr(opt_state.model_chunks[0], "ddp_config", None)
    if getattr(ddp_config, "use_distributed_optimizer", False) and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise ValueError(f"{directory} holds distributed-optimizer state saved under TP{saved['tp']} PP{saved['pp']}; "
                         f"it reloads only under the same TP/PP (now TP{now['tp']} PP{now['pp']})")
    if not same_layout:
        log.warning("checkpoint %s was saved under %s, now %s: RNG states are not restored", directory, saved, now)
    _init_dummy_state(opt_state.optimizer)
    with torch.no_grad():
        template = _sharded_state(opt_state, is_loading=True)
        if same_layout:
            template["rank_state"] = _rank_object(None)
        loaded = dist_checkpointing.load(template, str(directory))
        model_chunks = opt_state.model_chunks
        if len(model_chunks) == 1:
            unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
        else:
            for i, chunk in enumerate(model_chunks):
                unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        opt_state.optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step(opt_state.optimizer, common["adam_step"])
    if same_layout:
        set_rng_state(loaded["rank_state"]["rng"])
    dist.barrier()
    return common["train_state"]
