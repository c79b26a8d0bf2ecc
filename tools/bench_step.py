#!/usr/bin/env python
"""ViSurf vs RLVR step time on the tiny CPU setup, with the same rollouts, measured in one run.

Each step samples G rollouts per prompt once; then the RLVR update (G rows per prompt) and the ViSurf
update (G+1 rows per prompt: the GT joins the group) run on those same rollouts. The step time of a
paradigm is sync + generation + rewards + its update. The paper reports 1.009x (ViSurf / RLVR);
the goal here is <= 1.03x.

    python tools/bench_step.py --steps 6 --nproc 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bench(base: dict, steps: int) -> dict:
    import torch

    from visurf_megatron.algorithm.paradigms import RowBatch, get_paradigm
    from visurf_megatron.config import from_dict
    from visurf_megatron.training import experience
    from visurf_megatron.training.metrics import MetricSums
    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(from_dict(base))
    paradigms = {"rlvr": get_paradigm("rlvr"), "visurf": get_paradigm("visurf")}
    timings = {name: [] for name in paradigms}
    for step in range(steps + 1):  # step 0 warms caches up and is not counted
        prompts = [trainer.preparer(s) for s in trainer.feed.next_batch()]
        t0 = time.perf_counter()
        trainer.sync_weights()
        completions = experience.generate_rollouts(trainer.engine, prompts, trainer.sampling(step), call_index=step)
        shared = time.perf_counter() - t0
        for name, paradigm in paradigms.items():
            trainer.paradigm = paradigm
            t1 = time.perf_counter()
            rows = experience.build_rows(prompts, completions, with_gt=paradigm.uses_gt_rows(step),
                                         gt_style=trainer.cfg.algorithm.gt_style, tokenizer=trainer.tokenizer,
                                         end_of_turn_id=trainer.end_of_turn_id, forbidden_ids=trainer.forbidden_ids)
            experience.score_rows(rows, prompts, trainer.reward_fn, gt_no_thinking=True)
            rewards, _, correct = experience.reward_tensors(rows, "total", 1.0)
            batch = RowBatch(torch.tensor(rewards, dtype=torch.float64), torch.tensor([r.prompt for r in rows]),
                             torch.tensor([r.is_gt for r in rows]), torch.tensor(correct))
            info = paradigm.compute_row_info(batch, step)
            trainer._rows_for_metrics = rows
            train_rows = [i for i in range(len(rows)) if info.active_rows[i]]
            trainer._update(rows, prompts, train_rows, info, MetricSums())
            if step > 0:
                timings[name].append(shared + time.perf_counter() - t1)
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up step)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (TP = nproc)")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt G (paper: 8)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="rollout length cap")
    args = parser.parse_args(argv)
    from tools.make_synthetic_grounding import generate
    from tools.make_tiny_checkpoint import make_tiny_checkpoint
    from visurf_megatron.runtime.spawn import run_world

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny_checkpoint(root / "hf", seed=0)
        generate(root / "data", train=32, val=0, size=112, seed=0, progress=False)
        base = {
            "model": {"hf_path": str(root / "hf"), "dtype": "fp32", "spec": "local"},
            "parallel": {"tp": args.nproc},
            "rollout": {"engine": "hf", "n": args.rollouts, "max_new_tokens": args.max_new_tokens},
            "data": {"train_path": str(root / "data" / "train.jsonl"), "image_size": 112,
                     "prompts_per_step": args.prompts},
            "train": {"lr": 1e-4, "micro_batch_size": 4},
            "logging": {"dir": str(root / "logs"), "tensorboard": False},
        }
        result = run_world(_bench, args.nproc, base, args.steps, timeout_s=3600)[0]
    ratio = result["visurf"] / result["rlvr"]
    print(f"median step time over {args.steps} steps (G={args.rollouts}, {args.prompts} prompts, TP{args.nproc}):")
    print(f"  RLVR   {result['rlvr']:.3f}s")
    print(f"  ViSurf {result['visurf']:.3f}s")
    print(f"  ratio ViSurf/RLVR = {ratio:.3f}x  (paper 1.009x; goal <= 1.03x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
