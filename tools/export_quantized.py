#!/usr/bin/env python
"""Export a trained Qwen2.5-VL Hugging Face checkpoint quantised for serving (nvidia-modelopt).

From a trained run to a served model::

    python checkpoint_converters/megatron_to_hf.py --megatron-dir outputs/run/checkpoints --out-dir outputs/run/hf
    python tools/export_quantized.py outputs/run/hf outputs/run/hf-fp8 --format fp8 \\
        --data data/train.jsonl --config examples/configs/qwen2_5_vl_7b_visurf.yaml
    vllm serve outputs/run/hf-fp8 --quantization modelopt

The calibration prompts are the dataset's first ``--calib-samples`` rows, prepared exactly as training
prepares them (image resized to ``data.image_size``, the task's prompt template, the chat template);
the fidelity figures come from the next ``--eval-samples`` rows (or ``--eval-data``). The output
directory appears only when complete (written beside it, then renamed) and holds
``export_report.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visurf_megatron.serving.quantize import FORMATS, REFUSED  # noqa: E402  (light: no torch work)


def _format_help() -> str:
    lines = [f"{name}: {fmt.quant_algo}; served by {fmt.engines}"
             + (" [needs CUDA]" if fmt.needs_cuda else "") for name, fmt in FORMATS.items()]
    return "\n".join(lines) + "\nrefused: " + ", ".join(REFUSED)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/export_quantized.py", description=__doc__.split("\n\n")[0],
        epilog="formats:\n" + _format_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="Hugging Face checkpoint directory (megatron_to_hf.py's output)")
    p.add_argument("output", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", default="fp8", help=f"quantisation format: {', '.join(FORMATS)} (default fp8)")
    p.add_argument("--data", required=True, help="calibration dataset (.jsonl, .parquet or save_to_disk dir)")
    p.add_argument("--eval-data", help="held-out prompts for the fidelity figures (default: --data rows "
                                       "after the calibration rows)")
    p.add_argument("--image-root", help="directory relative image paths resolve against")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration prompts (default 32)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--config", help="training YAML: its data.task / image_size / prompt_style / think shape "
                                    "the prompts (flags below override it)")
    p.add_argument("--task", choices=("grounding", "gui", "anomaly", "math"))
    p.add_argument("--image-size", type=int, help="square side images are resized to (training: data.image_size)")
    p.add_argument("--prompt-style", choices=("detailed", "plain"))
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt asks for <think> (training: data.think)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="quantise the vision tower and merger too (default: kept in --dtype)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the model and of every unquantised tensor (default bf16)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verbose", action="store_true", help="show modelopt's and transformers' own output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def prompt_settings(args):
    from visurf_megatron.serving.calibration import PromptSettings

    base = PromptSettings()
    if args.config:
        from visurf_megatron.config import load_config

        data = load_config(args.config).data
        base = PromptSettings(task=data.task, image_size=data.image_size, prompt_style=data.prompt_style,
                              think=data.think)
    return PromptSettings(
        task=args.task or base.task, image_size=args.image_size or base.image_size,
        prompt_style=args.prompt_style or base.prompt_style, think=base.think if args.think is None else args.think)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from visurf_megatron.serving.quantize import ExportOptions, export_quantized, resolve_format

    try:
        resolve_format(args.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def progress(items, desc, total):
        if args.no_progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, unit="prompt", file=sys.stderr, leave=False)

    options = ExportOptions(
        format=args.format, data=args.data, eval_data=args.eval_data, image_root=args.image_root,
        calib_samples=args.calib_samples, eval_samples=args.eval_samples, prompts=prompt_settings(args),
        quantize_vision=args.quantize_vision, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
        verbose=args.verbose)
    try:
        export_quantized(args.source, args.output, options, progress=progress)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
