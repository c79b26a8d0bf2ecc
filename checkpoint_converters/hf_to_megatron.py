#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL (or Qwen2-VL, by its model_type) checkpoint into a megatron-core
distributed checkpoint.

Run under torchrun/srun with tp*pp ranks, or plainly: the script then starts tp*pp local (gloo)
processes itself. Each rank reads only the tensors its shard needs. The output reloads under any
TP/PP (megatron dist_checkpointing) and carries the tokenizer/processor files for the way back.

    python checkpoint_converters/hf_to_megatron.py --hf-dir Qwen2.5-VL-7B-Instruct --out-dir ckpt/7b-tp4 --tp 4
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visurf_megatron.checkpoint.convert import ConversionError, launch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out-dir", required=True, help="output megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saved shards (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saved shards (default 1)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="parameter dtype of the megatron checkpoint (default: the HF checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        info = launch("hf_to_megatron", args.tp * args.pp, dict(
            hf_dir=args.hf_dir, out_dir=args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
            overwrite=args.overwrite, progress=not args.no_progress))
    except ConversionError as exc:
        print(f"hf_to_megatron: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info['out_dir']} ({info['tensors']} HF tensors, tp={info['tp']} pp={info['pp']}, {info['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
