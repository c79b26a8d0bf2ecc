#!/usr/bin/env python
"""Convert a megatron-core Qwen2.5-VL (or Qwen2-VL) checkpoint (from hf_to_megatron or from training) to
Hugging Face.

Writes sharded safetensors with model.safetensors.index.json in the Hub key naming, config.json and
the tokenizer / processor / chat-template / generation files, so transformers and vLLM load the
result as is. Optimizer state in training checkpoints is ignored. --megatron-dir may be a checkpoint
or a training run's checkpoint root (its latest iteration is used).

    python checkpoint_converters/megatron_to_hf.py --megatron-dir runs/7b/checkpoints --out-dir hf-out
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visurf_megatron.checkpoint.convert import ConversionError, launch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True, help="megatron checkpoint (or training checkpoint root)")
    parser.add_argument("--out-dir", required=True, help="output HF model directory")
    parser.add_argument("--hf-template", default=None,
                        help="HF directory to copy tokenizer/processor/generation files from "
                             "(default: the copies stored in the megatron checkpoint)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="dtype of the written tensors (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load with (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load with (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        info = launch("megatron_to_hf", args.tp * args.pp, dict(
            megatron_dir=args.megatron_dir, out_dir=args.out_dir, hf_template=args.hf_template, dtype=args.dtype,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, tp=args.tp, pp=args.pp,
            progress=not args.no_progress))
    except ConversionError as exc:
        print(f"megatron_to_hf: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info['out_dir']} ({info['tensors']} tensors in {len(info['files'])} file(s), {info['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
