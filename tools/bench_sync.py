#!/usr/bin/env python
"""Benchmark the rollout weight sync (``rollout.sync.export_hf_weights``) on a gloo world.

Every rank builds a wide random Qwen2.5-VL megatron model directly at its TP/PP layout (no HF
checkpoint), then, in lockstep:

1. one warm-up export (builds and caches the transfer plan; timed separately),
2. ``--repeats`` timed exports (the consumer drops each tensor, as a weight loader that copies it
   would); this rank's peak RSS is read once the model is built and again after all exports,
3. after each timed export, one raw ``all_gather_into_tensor`` over the whole world that leaves the
   same bytes on every rank (each rank contributes 1/world of them, in one call): the reference.
   (The RSS read after the first reference includes its output buffer, the size of the model: the
   "after all syncs" figure is taken after the exports only, the first one before any reference.)

It prints the sync time as a ratio to the raw all-gather (goal <= 1.3), the collective counts and
the peak RSS per rank with the model shard and bucket sizes next to it.

    python tools/bench_sync.py                       # TP2 x PP2, ~360 MB fp32 model, 64 MB buckets
    python tools/bench_sync.py --bucket-mb 16 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _hf_config(a):
    from tools.make_tiny_checkpoint import SPECIAL_TOKENS, TinySpec, build_config

    spec = TinySpec(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate,
                    vocab_size=a.vocab, vision_depth=a.vision_depth, vision_hidden=a.vision_hidden,
                    vision_heads=a.vision_heads, vision_intermediate=a.vision_intermediate, tied=False)
    # Special tokens at the top of the vocabulary: no tokenizer is needed to benchmark weights.
    token_ids = {t: a.vocab - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return build_config(spec, token_ids, tokenizer_len=a.vocab)


def bench_rank(args: dict) -> dict:
    import torch
    import torch.distributed as dist

    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel
    from visurf_megatron.rollout.sync import ExportStats, export_hf_weights, get_plan
    from visurf_megatron.runtime import setup_model_parallel

    a = argparse.Namespace(**args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    setup_model_parallel(tp=a.tp, pp=a.pp, seed=1)
    lang, vis, extras = configs_from_hf(_hf_config(a), ParallelLayout(tp=a.tp, pp=a.pp), params_dtype=dtype)
    model = Qwen25VLModel(lang, vis, extras)
    chunks = [model]
    shard_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    bucket_bytes = int(a.bucket_mb * 2**20)
    rss_model = _peak_rss_mb()

    def sync(stats):
        for _name, tensor in export_hf_weights(chunks, bucket_bytes=bucket_bytes, stats=stats):
            del tensor

    dist.barrier()
    t0 = time.perf_counter()
    warm = ExportStats()
    sync(warm)
    dist.barrier()
    warmup_s = time.perf_counter() - t0
    plan, _ = get_plan(chunks, bucket_bytes=bucket_bytes)
    rss_before = _peak_rss_mb()
    # Reference: one raw all-gather over the world leaving the same bytes on every rank. Timed
    # exports and reference all-gathers alternate so that both see the same machine load.
    world = dist.get_world_size()
    per_rank = -(-warm.bytes // world)
    send = None
    sync_times, gather_times, stats, rss_sync = [], [], ExportStats(), 0.0
    for i in range(a.repeats):
        stats = ExportStats()
        dist.barrier()
        t0 = time.perf_counter()
        sync(stats)
        dist.barrier()
        sync_times.append(time.perf_counter() - t0)
        if i == 0:
            rss_sync = _peak_rss_mb()  # before any reference buffer (model-sized) exists
            send = torch.full((per_rank,), dist.get_rank() % 251, dtype=torch.uint8)
        out = torch.empty(per_rank * world, dtype=torch.uint8)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather_into_tensor(out, send)
        dist.barrier()
        gather_times.append(time.perf_counter() - t0)
        del out
    return dict(rank=dist.get_rank(), warmup_s=warmup_s, sync_s=sync_times, gather_s=gather_times,
                stats=vars(stats).copy(), buckets_planned=len(plan.buckets), shard_mb=shard_mb,
                rss_model_mb=rss_model, rss_warm_mb=rss_before, rss_sync_mb=rss_sync, largest_tensor_mb=plan.largest_tensor_bytes / 2**20)


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the Megatron -> HF weight stream of the rollout sync against a raw "
                                "all-gather of the same bytes on a gloo world (CPU).")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (%(default)s)")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size; world = tp * pp ranks (%(default)s)")
    p.add_argument("--bucket-mb", type=float, default=64, help="sync bucket size in MiB (%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed exports and reference all-gathers (%(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="parameter dtype (%(default)s)")
    sizes = [
        ("--hidden", 1024, "language hidden size"),
        ("--layers", 4, "language layers (divisible by --pp)"),
        ("--heads", 16, "language attention heads"),
        ("--kv-heads", 4, "language key/value heads"),
        ("--intermediate", 2816, "language MLP size"),
        ("--vocab", 16384, "vocabulary size"),
        ("--vision-depth", 2, "vision blocks"),
        ("--vision-hidden", 512, "vision hidden size"),
        ("--vision-heads", 8, "vision attention heads"),
        ("--vision-intermediate", 1408, "vision MLP size"),
    ]
    for flag, default, text in sizes:
        p.add_argument(flag, type=int, default=default, help=f"{text} (%(default)s)")
    p.add_argument("--malloc-mmap-threshold-kb", type=int, default=1024,
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ for the ranks so that freed buckets go back to the OS; "
                   "glibc's dynamic threshold otherwise keeps up to 32 MiB blocks in its heaps and the peak RSS "
                   "measures fragmentation, not live memory (0: leave glibc's default) (%(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the world is killed (%(default)s)")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.bucket_mb <= 0:
        p.error("--repeats must be >= 1 and --bucket-mb > 0")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    from visurf_megatron.runtime.spawn import run_world

    a = _parse_args(argv)
    if a.malloc_mmap_threshold_kb > 0:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold_kb * 1024)
    world = a.tp * a.pp
    t0 = time.perf_counter()
    results = run_world(bench_rank, world, vars(a), timeout_s=a.timeout)
    wall = time.perf_counter() - t0
    # A collective step takes as long as its slowest rank: per repeat, the max over ranks.
    sync_t = [max(r["sync_s"][i] for r in results) for i in range(a.repeats)]
    gather_t = [max(r["gather_s"][i] for r in results) for i in range(a.repeats)]
    sync, gather = statistics.median(sync_t), statistics.median(gather_t)
    ratio = statistics.median(x / y for x, y in zip(sync_t, gather_t))
    s = results[0]["stats"]
    print(f"world {world} ranks (tp={a.tp}, pp={a.pp}), {a.dtype}, bucket {a.bucket_mb:g} MiB, {a.repeats} repeats")
    print(f"model: {s['bytes'] / 2**20:.1f} MiB in {s['tensors']} HF tensors; largest tensor "
          f"{results[0]['largest_tensor_mb']:.1f} MiB; shards per rank "
          + ", ".join(f"{r['shard_mb']:.0f}" for r in results) + " MiB")
    print(f"plan: {results[0]['buckets_planned']} buckets; per export {s['all_gathers']} all-gathers (rank 0), "
          f"{s['broadcasts']} broadcasts; first export (plan build) {max(r['warmup_s'] for r in results):.2f} s")
    print(f"sync {sync:.3f} s   raw all_gather of the same bytes {gather:.3f} s   (medians; best {min(sync_t):.3f} / "
          f"{min(gather_t):.3f} s)")
    print(f"ratio sync / all_gather: {ratio:.2f} (median of per-repeat ratios; of best times "
          f"{min(sync_t) / min(gather_t):.2f}; goal <= 1.3)")
    for r in results:
        print(f"rank {r['rank']}: peak RSS {r['rss_model_mb']:.0f} MiB with the model built, {r['rss_sync_mb']:.0f} MiB "
              f"after all syncs (+{r['rss_sync_mb'] - r['rss_model_mb']:.0f}; model shard {r['shard_mb']:.0f} MiB, "
              f"largest bucket materialised {r['stats']['max_bucket_bytes'] / 2**20:.1f} MiB)")
    print(f"wall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
