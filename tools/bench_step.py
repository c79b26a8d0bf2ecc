#!/usr/bin/env python
"""ViSurf vs RLVR step time on the tiny CPU setup, with the same rollouts, measured in one run.

Each step samples G rollouts per prompt once; then the RLVR update (G rows per prompt) and the ViSurf
update (G+1 rows per prompt: the GT joins the group) run on those same rollouts, each three times:
padded micro-batches (``train.micro_batch_size`` rows, padded to the longest row of the update),
packed ones (``train.max_tokens_per_micro_batch``: whole rows in token-budget streams) with one
vision pass per update (``train.shared_vision_pass``, the default), and packed with one vision pass
per micro-batch that holds a prompt's rows. The step time of a paradigm is sync + generation +
rewards + its update; vision time is the vision tower's forward time within the update. The paper reports 1.009x
(ViSurf / RLVR); the goal here is <= 1.03x, printed last (packed) as the median of the per-step
ratios (the two paradigms of a step share its rollouts and its machine state, so the pairing cancels
what a ratio of two medians would keep), with the quartiles of those ratios to show the noise.

    python tools/bench_step.py            # 12 steps, G=8, responses up to 256 tokens: ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vision_clock(trainer) -> list:
    """Accumulates the vision tower's forward seconds (first pipeline stage) into the returned cell."""
    import time

    spent = [0.0]
    for chunk in trainer.chunks:
        vision = getattr(getattr(chunk, "module", chunk), "vision_model", None)
        if vision is None:
            continue
        vision.register_forward_pre_hook(lambda *_: spent.append(time.perf_counter()))
        vision.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - spent.pop()))
    return spent


class _ActivationMeter:
    """Peak bytes of tensors autograd keeps for backward (the activations, which scale with the tokens of
    a micro-batch), each storage counted once while alive; parameters are not activations and are
    skipped. On CPU this stands in for the GPU's peak memory per micro-batch."""

    def __init__(self):
        import torch

        self.live: dict = {}
        self.bytes = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        import weakref

        import torch

        base = t if t._base is None else t._base
        if isinstance(base, torch.nn.Parameter) or t.device.type == "meta":
            return t
        key = base.untyped_storage().data_ptr()
        if key not in self.live:
            self.live[key] = [base.untyped_storage().nbytes(), 0]
            self.bytes += self.live[key][0]
            self.peak = max(self.peak, self.bytes)
        self.live[key][1] += 1
        holder = _Held(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[key]

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _bench(base: dict, steps: int, budget: int) -> dict:
    import torch

    from visurf_megatron.algorithm.paradigms import RowBatch, get_paradigm
    from visurf_megatron.config import from_dict
    from visurf_megatron.training import experience
    from visurf_megatron.training.metrics import MetricSums
    from visurf_megatron.training.trainer import Trainer

    trainer = Trainer(from_dict(base))
    vision = _vision_clock(trainer)
    paradigms = {"rlvr": get_paradigm("rlvr"), "visurf": get_paradigm("visurf")}
    modes = {"padded": (0, True), "packed": (budget, True), "per-mb": (budget, False)}
    timings = {(name, mode, part): [] for name in paradigms for mode in modes
               for part in ("step", "update", "vision", "act_mb")}
    for step in range(steps + 1):  # step 0 warms caches up and is not counted
        prompts = [trainer.preparer(s) for s in trainer.feed.next_batch()]
        t0 = time.perf_counter()
        trainer.sync_weights()
        completions = experience.generate_rollouts(trainer.engine, prompts, trainer.sampling(step), call_index=step)
        shared = time.perf_counter() - t0
        names = list(paradigms) if step % 2 else list(paradigms)[::-1]  # no order bias between paradigms
        for name in names:
            paradigm = trainer.paradigm = paradigms[name]
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
            before = time.perf_counter() - t1  # rows and rewards: the same for both layouts
            order = list(modes.items())
            for mode, (max_tokens, shared_vision) in order if step % 2 else order[::-1]:  # no order bias
                trainer.cfg.train.max_tokens_per_micro_batch = max_tokens
                trainer.cfg.train.shared_vision_pass = shared_vision
                vision[0] = 0.0
                meter = _ActivationMeter()
                t2 = time.perf_counter()
                with meter.hooks:
                    trainer._update(rows, prompts, train_rows, info, MetricSums())
                update = time.perf_counter() - t2
                if step > 0:
                    timings[(name, mode, "step")].append(shared + before + update)
                    timings[(name, mode, "update")].append(update)
                    timings[(name, mode, "vision")].append(vision[0])
                    timings[(name, mode, "act_mb")].append(meter.peak / 2**20)
    return timings


def paired_ratio(numerator: list, denominator: list) -> tuple:
    """Median of the per-step ratios a_i / b_i, and their quartiles as text.

    Both paradigms of a step update on the same rollouts, back to back, so a slow step (a longer
    rollout, a busy machine) slows both: the per-step ratio cancels it, where a ratio of two medians
    taken over different steps does not."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    if len(ratios) < 2:
        return ratios[0], "n/a (one step)"
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), f"{q1:.3f}-{q3:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after one warm-up step)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (TP = nproc)")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt G (paper: 8)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="rollout length cap (the tiny random policy spreads its lengths up to it)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per padded micro-batch")
    parser.add_argument("--max-tokens", type=int, default=2400,
                        help="token budget per packed micro-batch (default: about micro-batch-size padded rows "
                             "of this setup, whose rows are ~300-560 tokens at the default length cap)")
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
            "train": {"lr": 1e-4, "micro_batch_size": args.micro_batch_size},
            "logging": {"dir": str(root / "logs"), "tensorboard": False},
        }
        timings = run_world(_bench, args.nproc, base, args.steps, args.max_tokens, timeout_s=3600)[0]
    result = {key: statistics.median(values) for key, values in timings.items()}
    print(f"median seconds over {args.steps} steps (G={args.rollouts}, {args.prompts} prompts, TP{args.nproc}; "
          f"padded: {args.micro_batch_size} rows per micro-batch, packed: {args.max_tokens} tokens, one vision "
          "pass per update; per-mb: packed, one vision pass per micro-batch):")
    print("  (act MB: peak activations autograd holds during the update, TP rank 0: one micro-batch at PP1)")
    print(f"  {'':8s} {'layout':7s} {'step':>8s} {'update':>8s} {'vision':>8s} {'act MB':>8s}")
    for name, label in (("rlvr", "RLVR"), ("visurf", "ViSurf")):
        for mode in ("padded", "packed", "per-mb"):
            print(f"  {label:8s} {mode:7s} " + " ".join(f"{result[(name, mode, part)]:8.3f}"
                                                       for part in ("step", "update", "vision", "act_mb")))
    for name, label in (("rlvr", "RLVR"), ("visurf", "ViSurf")):
        speedup = result[(name, "padded", "update")] / result[(name, "packed", "update")]
        per_mb = result[(name, "per-mb", "update")] / result[(name, "packed", "update")]
        print(f"  {label} update speed-up packed/padded = {speedup:.2f}x; one vision pass per update vs per "
              f"micro-batch = {per_mb:.2f}x")
    padded, padded_spread = paired_ratio(timings[("visurf", "padded", "step")], timings[("rlvr", "padded", "step")])
    print(f"  ratio ViSurf/RLVR (padded) = {padded:.3f}x  (per-step ratios, quartiles {padded_spread})")
    ratio, spread = paired_ratio(timings[("visurf", "packed", "step")], timings[("rlvr", "packed", "step")])
    print(f"  per-step ratios ViSurf/RLVR (packed): quartiles {spread}")
    print(f"  ratio ViSurf/RLVR (packed) = {ratio:.3f}x  (median of per-step ratios; paper 1.009x; goal <= 1.03x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
