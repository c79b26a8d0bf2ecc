#!/usr/bin/env python
"""Benchmark the checkpoint converters on a synthetic checkpoint with Qwen2.5-VL-7B widths.

Builds an HF directory with the 7B geometry (hidden 3584, intermediate 18944, 28 heads, 4 query
groups, vocab 152064, the full 32-block vision tower) but only a few language layers, converts
HF -> Megatron (TP2 by default) and back, and prints, measured in this one run:

* conversion wall time as a ratio to the raw floor: reading + writing the same bytes with
  safetensors (HF -> copy -> copy), i.e. what any converter must at least spend on I/O;
* the peak RSS of every rank, next to the size of the largest tensor.

    python tools/bench_convert.py --layers 2 --tp 2 --workdir /tmp/bench_convert
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file  # noqa: E402

from visurf_megatron.runtime.spawn import run_world  # noqa: E402

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


def raw_floor(src: Path, scratch: Path) -> float:
    """Read every shard and write it again, twice (the converter round trip moves the bytes twice)."""
    start = time.perf_counter()
    current = src
    for step in range(2):
        dst = scratch / f"copy{step}"
        dst.mkdir(parents=True)
        for shard in sorted(current.glob("*.safetensors")):
            save_file(load_file(shard), str(dst / shard.name))
        current = dst
    return time.perf_counter() - start


def peak_rss_gib() -> float:
    """This process's peak resident memory.

    Linux's VmHWM, not ``ru_maxrss``: ranks are started by fork+exec from this benchmark, and
    ``ru_maxrss`` keeps the high-water mark of the address space replaced by exec, i.e. of the
    parent after it wrote and copied the synthetic checkpoint (~5 GiB), whatever the rank uses.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="language layers (7B has 28; default 2)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the megatron checkpoint (default 2)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="checkpoint dtype (default bf16)")
    parser.add_argument("--workdir", default="/tmp/visurf_bench_convert", help="scratch directory (removed first)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = seven_b_config(args.layers, {"bf16": "bfloat16", "fp32": "float32"}[args.dtype])
    largest = max(torch.Size(s).numel() for s in hf_shapes(cfg).values()) * torch.tensor([], dtype=dtype).element_size()
    total = write_synthetic(work / "hf", cfg, dtype)
    print(f"synthetic 7B-width checkpoint: {total / GIB:.2f} GiB, largest tensor {largest / GIB:.2f} GiB")
    floor = raw_floor(work / "hf", work / "floor")
    shutil.rmtree(work / "floor")
    world = args.tp * args.pp
    t0 = time.perf_counter()
    to_meg = run_world(_rank, world, "hf_to_megatron", dict(hf_dir=str(work / "hf"), out_dir=str(work / "meg"),
                       tp=args.tp, pp=args.pp, progress=False), timeout_s=3600)
    t1 = time.perf_counter()
    to_hf = run_world(_rank, world, "megatron_to_hf", dict(megatron_dir=str(work / "meg"), out_dir=str(work / "back"),
                      tp=args.tp, pp=args.pp, max_shard_size="2GB", progress=False), timeout_s=3600)
    t2 = time.perf_counter()
    convert_s = (t1 - t0) + (t2 - t1)
    inner_s = max(r["seconds"] for r in to_meg) + max(r["seconds"] for r in to_hf)
    print(f"raw safetensors floor (read+write x2): {floor:.1f}s")
    print(f"HF->Megatron TP{args.tp}PP{args.pp}: {t1 - t0:.1f}s   Megatron->HF: {t2 - t1:.1f}s   (incl. process start)")
    print(f"ratio to floor: {convert_s / floor:.2f} (goal <= 1.5); without process start-up: {inner_s / floor:.2f}")
    for direction, results in (("hf_to_megatron", to_meg), ("megatron_to_hf", to_hf)):
        rss = ", ".join(f"rank{r}: {res['max_rss_gib']:.2f}" for r, res in enumerate(results))
        print(f"peak RSS GiB {direction}: {rss}   (goal <= 2 + largest tensor = {2 + largest / GIB:.2f})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
