#!/usr/bin/env python
"""Benchmark the checkpoint converters on a synthetic checkpoint with Qwen2.5-VL-7B widths.

Builds an HF directory with the 7B geometry (hidden 3584, intermediate 18944, 28 heads, 4 query
groups, vocab 152064, the full 32-block vision tower) but only a few language layers, converts
HF -> Megatron (TP2 by default) and back, and prints, measured in this one run:

* conversion wall time as a ratio to the raw floor: reading + writing the same bytes with
  safetensors (HF -> copy -> copy), i.e. what any converter must at least spend on I/O. Each
  conversion runs in a fresh process, as the CLI does (interpreter and imports included). Floor and
  conversion steps alternate, each after a ``sync`` and with none of the benchmark's files in the
  page cache: the input is read from disk, as a checkpoint written a while ago (``--input-cache
  warm`` reads it into the cache first); the median over ``--repeats`` is the result;
* the peak RSS of every rank, next to the size of the largest tensor.

    python tools/bench_convert.py --layers 2 --tp 2 --workdir /tmp/bench_convert
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file  # noqa: E402


GIB = 2**30


def seven_b_config(layers: int, dtype: str) -> dict:
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "tie_word_embeddings": False, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "dtype": dtype,
        "text_config": {
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": layers,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        "vision_config": {
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3, "tokens_per_second": 2, "hidden_act": "silu",
        },
    }


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    t, v = cfg["text_config"], cfg["vision_config"]
    h, f, heads, kv, vocab = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"], t["vocab_size"]
    d = h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.q_proj.bias": (heads * d,),
            p + "self_attn.k_proj.weight": (kv * d, h), p + "self_attn.k_proj.bias": (kv * d,),
            p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.v_proj.bias": (kv * d,),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    vh, vf, m = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
    shapes["visual.patch_embed.proj.weight"] = (vh, 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (vh,), p + "norm2.weight": (vh,),
            p + "attn.qkv.weight": (3 * vh, vh), p + "attn.qkv.bias": (3 * vh,),
            p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
            p + "mlp.gate_proj.weight": (vf, vh), p + "mlp.gate_proj.bias": (vf,),
            p + "mlp.up_proj.weight": (vf, vh), p + "mlp.up_proj.bias": (vf,),
            p + "mlp.down_proj.weight": (vh, vf), p + "mlp.down_proj.bias": (vh,),
        })
    mh = vh * m * m
    shapes.update({"visual.merger.ln_q.weight": (vh,), "visual.merger.mlp.0.weight": (mh, mh),
                   "visual.merger.mlp.0.bias": (mh,), "visual.merger.mlp.2.weight": (v["out_hidden_size"], mh),
                   "visual.merger.mlp.2.bias": (v["out_hidden_size"],)})
    return shapes


def write_synthetic(directory: Path, cfg: dict, dtype: torch.dtype, shard_bytes: int = 2 * GIB) -> int:
    """Random tensors in HF layout, sharded like the Hub's; returns the total bytes."""
    from visurf_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "tokenizer_config.json").write_text("{}")  # assets copied through, not used here
    gen = torch.Generator().manual_seed(0)
    writer = ShardedSafetensorsWriter(directory, shard_bytes)
    for name, shape in hf_shapes(cfg).items():
        writer.add(name, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
    writer.close()
    return writer.total_bytes


SETTLE_S = 5.0


def evict(directory: Path) -> None:
    """Drop the (clean) page cache of every file under ``directory``: its next read comes from disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prime(directory: Path) -> None:
    """Read every file under ``directory`` once, so that the next read finds it in the page cache."""
    buffer = bytearray(64 << 20)
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def timed(step, work: Path, reads: Path, cached: bool = False) -> tuple[float, object]:
    """Seconds ``step()`` takes, started from the same memory, cache and write-back state as every
    other step.

    ``sync`` first: otherwise a step pays for the write-back of the one before it (the kernel
    throttles writers once ~20 % of memory is dirty). Then every file of the benchmark (``work``)
    leaves the page cache, so no step runs with what the step before left cached (a converter that
    leaves its output cached slows down the floor after it, one that drops it behind does not); the
    step's input (``reads``) is read from disk, for floor and conversion alike, as a checkpoint
    written or downloaded a while ago, or with ``cached`` read into the cache first. Then a pause: on a VM that reports free pages to its host
    (Linux free page reporting, after ~2 s), memory freed just before (the previous step's deleted
    output) is cheap to reuse at once and costs a host fault per page later. The floor started
    within milliseconds of a delete, a conversion only after its ranks' start-up, so without the
    pause the floor alone wrote into warm memory (measured here: 2 GiB of page cache in 0.4 s
    warm, 3-5 s cold).
    """
    os.sync()
    evict(work)
    if cached:  # --input-cache warm: the input is read into the page cache first (not timed)
        prime(reads)
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, result


def copy_with_safetensors(src: Path, dst: Path) -> None:
    """The raw floor of one direction: read every shard and write it again with safetensors."""
    dst.mkdir(parents=True)
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), str(dst / shard.name))


def peak_rss_gib() -> float:
    """This process's peak resident memory.

    Linux's VmHWM, not ``ru_maxrss``: where ranks are spawned (fork+exec), ``ru_maxrss`` keeps the
    high-water mark of the address space replaced by exec, i.e. of the process that started them.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _rank(fn_name: str, kwargs: dict) -> dict:
    from visurf_megatron.checkpoint import convert

    start = time.perf_counter()
    getattr(convert, fn_name)(**kwargs)
    return {"seconds": time.perf_counter() - start, "max_rss_gib": peak_rss_gib()}


def convert_in_fresh_process(fn_name: str, world: int, kwargs: dict) -> list[dict]:
    """One conversion as the CLI runs it: a new interpreter, which starts its local world of ranks
    (``convert.local_world``); returns each rank's seconds and peak RSS."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--rank-driver", json.dumps([fn_name, world, kwargs])],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise RuntimeError(f"{fn_name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rank_driver(spec: str) -> int:
    from visurf_megatron.checkpoint.convert import local_world

    fn_name, world, kwargs = json.loads(spec)
    print(json.dumps(local_world(_rank, world, fn_name, kwargs, timeout_s=3600)))
    return 0


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--rank-driver":
        return _rank_driver(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="language layers (7B has 28; default 2)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the megatron checkpoint (default 2)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="checkpoint dtype (default bf16)")
    parser.add_argument("--workdir", default="/tmp/visurf_bench_convert", help="scratch directory (removed first)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure floor and conversions this many times; the median ratio is the result (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--input-cache", choices=["cold", "warm"], default="cold",
                        help="every step (floor and conversion) reads its input from disk (cold, the default: a "
                             "checkpoint written a while ago) or from the page cache (warm: read just before)")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    warm = args.input_cache == "warm"
    shutil.rmtree(work, ignore_errors=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = seven_b_config(args.layers, {"bf16": "bfloat16", "fp32": "float32"}[args.dtype])
    largest = max(torch.Size(s).numel() for s in hf_shapes(cfg).values()) * torch.tensor([], dtype=dtype).element_size()
    total = write_synthetic(work / "hf", cfg, dtype)
    print(f"synthetic 7B-width checkpoint: {total / GIB:.2f} GiB, largest tensor {largest / GIB:.2f} GiB")
    world = args.tp * args.pp
    layout = dict(tp=args.tp, pp=args.pp, progress=False)
    ratios = []
    for repeat in range(args.repeats):
        # Every step starts with a clean page cache and write-back state (see timed); outputs are
        # deleted as soon as they are measured.
        floor_in, _ = timed(lambda: copy_with_safetensors(work / "hf", work / "floor"),
                            work=work, reads=work / "hf", cached=warm)
        shutil.rmtree(work / "floor")
        to_meg_s, to_meg = timed(lambda: convert_in_fresh_process("hf_to_megatron", world, dict(
            hf_dir=str(work / "hf"), out_dir=str(work / "meg"), **layout)), work=work, reads=work / "hf", cached=warm)
        floor_out, _ = timed(lambda: copy_with_safetensors(work / "hf", work / "floor"),
                             work=work, reads=work / "hf", cached=warm)
        shutil.rmtree(work / "floor")
        to_hf_s, to_hf = timed(lambda: convert_in_fresh_process("megatron_to_hf", world, dict(
            megatron_dir=str(work / "meg"), out_dir=str(work / "back"), max_shard_size="2GB", **layout)),
            work=work, reads=work / "meg", cached=warm)
        if repeat + 1 < args.repeats or not args.keep:
            shutil.rmtree(work / "meg")
            shutil.rmtree(work / "back")
        floor, convert_s = floor_in + floor_out, to_meg_s + to_hf_s
        inner_s = max(r["seconds"] for r in to_meg) + max(r["seconds"] for r in to_hf)
        ratios.append(convert_s / floor)
        print(f"[{repeat + 1}/{args.repeats}] raw safetensors floor (read+write, each direction): "
              f"{floor_in:.1f}s + {floor_out:.1f}s")
        print(f"[{repeat + 1}/{args.repeats}] HF->Megatron TP{args.tp}PP{args.pp}: {to_meg_s:.1f}s "
              f"({to_meg_s / floor_in:.2f}x)   Megatron->HF: {to_hf_s:.1f}s ({to_hf_s / floor_out:.2f}x)   "
              f"(fresh process, as the CLI)")
        print(f"[{repeat + 1}/{args.repeats}] ratio to floor: {convert_s / floor:.2f}; without process start-up: "
              f"{inner_s / floor:.2f} (inside the ranks: {max(r['seconds'] for r in to_meg):.1f}s + "
              f"{max(r['seconds'] for r in to_hf):.1f}s)")
        for direction, results in (("hf_to_megatron", to_meg), ("megatron_to_hf", to_hf)):
            rss = ", ".join(f"rank{r}: {res['max_rss_gib']:.2f}" for r, res in enumerate(results))
            print(f"[{repeat + 1}/{args.repeats}] peak RSS GiB {direction}: {rss}   "
                  f"(goal <= 2 + largest tensor = {2 + largest / GIB:.2f})")
    print(f"ratio to floor ({args.input_cache} input), median of {len(ratios)}: {statistics.median(ratios):.2f} "
          f"(goal <= 1.5); "
          f"all: {', '.join(f'{r:.2f}' for r in ratios)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
