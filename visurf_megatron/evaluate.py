"""Evaluate a (converted) HF Qwen2.5-VL checkpoint on one benchmark.

    python -m visurf_megatron.evaluate --model HF_DIR --data reasonseg_val/ --task grounding \\
        --engine vllm --sam2-checkpoint sam2_hiera_large.pt --out runs/eval/reasonseg_val

Greedy decoding, prompts and image frame exactly as in training (``--prompt``, ``--no-think``,
``--image-size``), predicted coordinates mapped back to the original image, masks from SAM2
(prompted with each predicted box + point, best of 3, OR-ed) or from the boxes (``--segmenter box``),
then the task's metrics (grounding: gIoU, cIoU, N-Acc, T-Acc, bbox acc; gui: point-in-box accuracy;
anomaly: ROC-AUC on the mask-area score and yes/no accuracy; math: math-verify accuracy; chartqa:
relaxed accuracy; docvqa: ANLS). Writes OUT/metrics.json, metrics.md, predictions.jsonl, run.json and
overlays/*.png. Re-running the same command resumes after an interruption. Nothing is downloaded:
the SAM2 weights are a local file and its config one of the sam2 package's own.
"""
from __future__ import annotations

import argparse
import sys

from visurf_megatron.data.samples import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visurf_megatron.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--data", required=True,
                   help="evaluation set: .jsonl, .parquet or a datasets save_to_disk directory")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="output directory (created; re-use it to resume)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers (CPU or GPU); vllm: vLLM on one GPU (default hf)")
    p.add_argument("--prompt", choices=("detailed", "plain"), default="detailed", help="prompt template style")
    p.add_argument("--no-think", action="store_true", help="the no-thinking template (as trained with it)")
    p.add_argument("--image-size", type=int, default=840, help="square frame the images are resized to (default 840)")
    p.add_argument("--segmenter", choices=("sam2", "box"), default=None,
                   help="masks for grounding/anomaly: sam2 (default) or the filled predicted boxes")
    p.add_argument("--sam2-config", default=None,
                   help="sam2 package config, e.g. configs/sam2/sam2_hiera_l.yaml (default: from the checkpoint name)")
    p.add_argument("--sam2-checkpoint", default=None, help="local SAM2 weights file, e.g. sam2_hiera_large.pt")
    p.add_argument("--sam2-random-init", action="store_true",
                   help="SAM2 with random weights (pipeline tests only: the numbers are meaningless)")
    p.add_argument("--sam2-image-size", type=int, default=None,
                   help="override SAM2's input resolution (fast tests only; real weights expect the config's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per response (default 1024)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="requests per generate call; predictions are saved after each batch (default 8)")
    p.add_argument("--overlays", type=int, default=8, help="PNG overlays for the first K samples (default 8)")
    p.add_argument("--benchmark", default=None, help="name in metrics.json and tables (default: from --data)")
    p.add_argument("--split", default=None, help="split of a DatasetDict directory")
    p.add_argument("--image-root", default=None, help="directory relative image/mask paths resolve against")
    p.add_argument("--bbox-mode", choices=("any", "union"), default="any",
                   help="bbox acc: any predicted box, or their union box, IoU > 0.5 with the GT (default any)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="model dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="hf engine device (default cuda if available, else cpu)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm: share of GPU memory")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from visurf_megatron.eval.runner import EvalConfig, EvalError, run_evaluation

    cfg = EvalConfig(
        model=args.model, data=args.data, task=args.task, out=args.out, engine=args.engine, prompt=args.prompt,
        think=not args.no_think, image_size=args.image_size, segmenter=args.segmenter,
        sam2_config=args.sam2_config, sam2_checkpoint=args.sam2_checkpoint, sam2_random_init=args.sam2_random_init,
        sam2_image_size=args.sam2_image_size, limit=args.limit, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, overlays=args.overlays, benchmark=args.benchmark, split=args.split,
        image_root=args.image_root, bbox_mode=args.bbox_mode, dtype=args.dtype, device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    try:
        payload = run_evaluation(cfg)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from visurf_megatron.eval.runner import metrics_markdown

    print(metrics_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
