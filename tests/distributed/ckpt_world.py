"""Rank functions for the training-checkpoint tests (module-level so ``spawn`` can import them)."""
from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import torch
import torch.distributed as dist

LR = 1e-3


def build(hf_dir, tp, pp, dist_opt):
    from tests.distributed.qwen_world import build_model
    from visurf_megatron.config import ParallelConfig, TrainConfig
    from visurf_megatron.training.optimizer import wrap_and_build_optimizer

    model, extras, _ = build_model(hf_dir, tp, pp, sp=False, seed=11)
    train_cfg = TrainConfig(lr=LR, grad_clip=1.0)
    parallel_cfg = ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=dist_opt)
    return wrap_and_build_optimizer([model], train_cfg, parallel_cfg, torch.float32), extras


def micro_batches(batch, extras):
    """Three same-shape micro-batches of the fixture batch that differ in their loss masks."""
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids
    from visurf_megatron.training.batching import MicroBatch

    ids, attention = batch["input_ids"], batch["attention_mask"]
    position_ids, _ = mrope_position_ids(ids, batch["image_grid_thw"], image_token_id=extras.image_token_id,
                                         spatial_merge_size=extras.spatial_merge_size, attention_mask=attention)
    labels = torch.roll(ids, -1, dims=1)
    mask = torch.zeros(ids.shape)
    mask[:, :-1] = attention[:, 1:].float()
    half = (torch.arange(ids.shape[1]) < ids.shape[1] // 2).float()
    rows = torch.arange(ids.shape[0])
    return [MicroBatch(ids, labels, m, position_ids, batch["pixel_values"], batch["image_grid_thw"], rows)
            for m in (mask, mask * half, mask * (1 - half))]


def param_digest(opt_state) -> str:
    from visurf_megatron.checkpoint.mapping import unwrap

    h = hashlib.sha256()
    for name, p in unwrap(opt_state.model_chunks[0]).named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_step(opt_state, mbs) -> dict:
    """One step that consumes every RNG the checkpoint restores: python, numpy, torch, megatron tracker."""
    from megatron.core import parallel_state, tensor_parallel

    from visurf_megatron.training.forward import run_micro_batches
    from visurf_megatron.training.optimizer import zero_grads

    order = torch.randperm(len(mbs)).tolist()
    weight = 1.0 + 0.5 * random.random() + 0.5 * float(np.random.rand())
    with tensor_parallel.get_cuda_rng_tracker().fork():  # per-TP-rank stream, averaged over TP
        noise = torch.rand(1)
    dist.all_reduce(noise, group=parallel_state.get_tensor_model_parallel_group())
    weight += float(noise) / parallel_state.get_tensor_model_parallel_world_size()

    def loss_fn(mb, logp, entropy):
        loss = -(logp * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1) * weight
        return loss, {"loss": loss.detach()}

    zero_grads(opt_state)
    outputs = run_micro_batches(opt_state.model_chunks, [mbs[i] for i in order], loss_fn, forward_only=False)
    success, grad_norm, _ = opt_state.optimizer.step()
    assert success
    loss = float(torch.stack([o["loss"] for o in outputs]).sum()) if outputs else None
    return {"loss": loss, "grad_norm": float(grad_norm), "params": param_digest(opt_state)}


def _meta(hf_dir):
    import json
    from pathlib import Path

    return {"hf_config": json.loads((Path(hf_dir) / "config.json").read_text()), "hf_assets_src": str(hf_dir)}


def straight_world(hf_dir, batch, scenarios, steps):
    """Each scenario: 2N steps from the HF weights, saving at N (and before, to exercise pruning)."""
    from visurf_megatron.checkpoint.mapping import gather_hf_state_dict
    from visurf_megatron.training.checkpointing import save_training_checkpoint

    out = {}
    for sc in scenarios:
        opt_state, extras = build(hf_dir, sc["tp"], sc["pp"], sc["dist_opt"])
        mbs = micro_batches(batch, extras)
        records, timings, hf_at_save = [], [], None
        for step in range(1, 2 * steps + 1):
            records.append(train_step(opt_state, mbs))
            if step in sc["save_at"]:
                t0 = time.monotonic()
                train_state = {"step": step, "grad_norms": [r["grad_norm"] for r in records]}  # same on all ranks
                save_training_checkpoint(sc["root"], step, opt_state, train_state=train_state, meta=_meta(hf_dir),
                                         keep_last=sc.get("keep_last", 2))
                timings.append(time.monotonic() - t0)
                if step == steps and sc.get("gather_hf"):
                    # cloned: replicated tensors come back as views of the live parameters
                    hf_at_save = {k: v.clone() for k, v in gather_hf_state_dict(opt_state.model_chunks).items()}
        out[sc["name"]] = {"records": records, "save_s": timings,
                           "hf": hf_at_save if dist.get_rank() == 0 else None}
    return out


def resume_world(hf_dir, batch, scenarios, steps, empty_root, plain_pp2_root, distopt_tp2_root):
    """Each scenario: fresh model from HF, load the latest checkpoint, continue N steps.

    First, layout changes: the PP2 plain-optimizer checkpoint (still at step N) loads under TP2;
    the TP2 distributed-optimizer one is refused under PP2.
    """
    from visurf_megatron.checkpoint.mapping import gather_hf_state_dict
    from visurf_megatron.training.checkpointing import load_training_checkpoint, save_training_checkpoint

    opt_state, extras = build(hf_dir, 2, 1, False)
    out = {"empty": load_training_checkpoint(empty_root, opt_state)}  # None: nothing there
    state = load_training_checkpoint(plain_pp2_root, opt_state)
    hf = {k: v.clone() for k, v in gather_hf_state_dict(opt_state.model_chunks).items()}
    out["reshard"] = {"step": state["step"], "hf": hf if dist.get_rank() == 0 else None}
    out["reshard"]["next"] = train_step(opt_state, micro_batches(batch, extras))
    opt_state, _ = build(hf_dir, 1, 2, True)
    try:
        load_training_checkpoint(distopt_tp2_root, opt_state)
        out["refused"] = None
    except ValueError as exc:
        out["refused"] = str(exc)
    for sc in scenarios:
        opt_state, extras = build(hf_dir, sc["tp"], sc["pp"], sc["dist_opt"])
        mbs = micro_batches(batch, extras)
        fresh = param_digest(opt_state)
        t0 = time.monotonic()
        state = load_training_checkpoint(sc["root"], opt_state)
        load_s = time.monotonic() - t0
        loaded = param_digest(opt_state)
        records = [train_step(opt_state, mbs) for _ in range(state["step"] + 1, 2 * steps + 1)]
        if sc.get("save_again"):
            save_training_checkpoint(sc["root"], 2 * steps, opt_state, train_state={"step": 2 * steps},
                                     meta=_meta(hf_dir), keep_last=2)
        out[sc["name"]] = {"train_state": state, "records": records, "fresh": fresh, "loaded": loaded,
                           "load_s": load_s}
    return out
