"""The ViSurf trainer on megatron-core: rollouts -> GT rows -> rewards -> advantages -> update.

One step (DESIGN.md, "Data flow of one training step"):
 1. this DP rank's prompts;            2. weights synced into the rollout engine;
 3. G completions per prompt;          4. GT rows in the rollout style when the paradigm wants them;
 5. rewards (GT: thinking term 0);     6. advantages from the paradigm (optional group filter);
 7. old log-probs (only when the batch is split into several updates: with one update they equal
    the current ones, ratio = 1);      8. clipped-surrogate update(s) through megatron's schedule;
 9. metrics;                           10. checkpoint every N steps.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from visurf_megatron.algorithm.paradigms import RowBatch, filter_groups, paradigm_from_config
from visurf_megatron.checkpoint.hf_import import load_hf_state_dict_into
from visurf_megatron.checkpoint.megatron_io import (
    DTYPES, build_model, load_model, resolve_checkpoint_dir, transformer_overrides,
)
from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
from visurf_megatron.config import Config, validate
from visurf_megatron.data.gt_style import best_gt_style, get_gt_style
from visurf_megatron.data.samples import load_samples
from visurf_megatron.models.qwen2_5_vl.specs import select_backend
from visurf_megatron.rewards.registry import get_reward_fn
from visurf_megatron.rollout import build_engine
from visurf_megatron.rollout.base import SamplingConfig
from visurf_megatron.rollout.processor import load_processor
from visurf_megatron.rollout.sync import export_hf_weights, token_mult_prob_error
from visurf_megatron.runtime import setup_model_parallel

from . import experience
from .batching import padded_length, sequence_multiple
from .data_feed import PromptFeed, PromptPreparer
from .forward import run_micro_batches
from .gt_style_choice import AUTO, candidate_styles, score_gt_styles
from .metrics import MetricSums, MetricsLogger
from .packing import build_micro_batches, row_length
from .optimizer import guarded_step, lr_at, set_lr, wrap_and_build_optimizer, zero_grads
from .update_loss import attach_rows, update_loss_fn


# Paradigm metrics that are each micro-batch's share of a globally normalised sum.
ADDITIVE_METRICS = frozenset({"policy_loss", "kl_loss", "entropy_loss", "pg_loss", "sft_loss"})


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row (a checkpoint was written first)."""


class Trainer:
    def __init__(self, cfg: Config):
        if not cfg.model.hf_path:
            raise ValueError("model.hf_path is required (the HF directory: config, tokenizer, processor)")
        self.cfg = validate(cfg, dist.get_world_size())
        par = cfg.parallel
        setup_model_parallel(tp=par.tp, pp=par.pp, vpp=par.vpp, sequence_parallel=par.sequence_parallel,
                             seed=cfg.train.seed)
        self.dtype = DTYPES[cfg.model.dtype]
        self.hf_config = json.loads((Path(cfg.model.hf_path) / "config.json").read_text())
        model, self.extras = build_model(
            self.hf_config, par.tp, par.pp, self.dtype, sequence_parallel=par.sequence_parallel,
            backend=select_backend(cfg.model.spec), fp8_vision=cfg.model.fp8_vision,
            config_overrides=transformer_overrides(cfg.model), freeze_vision=cfg.model.freeze_vision,
            freeze_merger=cfg.model.freeze_merger, freeze_language=cfg.model.freeze_language,
        )
        self._load_initial_weights(model)
        self.opt = wrap_and_build_optimizer([model], cfg.train, par, self.dtype)
        self.paradigm = paradigm_from_config(cfg.algorithm)
        # An unknown style fails here, not at the first GT row. "auto" is resolved at the first step
        # with GT rows (it needs the loaded policy) and then kept, checkpoint included.
        self.gt_style: Optional[str] = None
        if cfg.algorithm.gt_style == AUTO:
            self.gt_style_candidates = candidate_styles(cfg.algorithm.gt_style_candidates)
        else:
            self.gt_style = get_gt_style(cfg.algorithm.gt_style).name
        self.reward_fn = get_reward_fn(cfg.data.task)
        self.processor = load_processor(cfg.model.hf_path)
        self.tokenizer = self.processor.tokenizer
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.forbidden_ids = [self.extras.image_token_id, self.extras.video_token_id,
                              self.extras.vision_start_token_id]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_of_turn_id
        self.spmd_engine = cfg.rollout.engine == "vllm"
        self.engine = None
        # Built up front only where the paradigm ever rolls out (SFT never does: an evaluation's first
        # sync_weights builds it then), and asleep until a weight sync needs it.
        if any(self.paradigm.needs_rollouts(s) for s in range(cfg.train.steps)):
            self._ensure_engine()
        self.preparer = PromptPreparer(self.processor, image_size=cfg.data.image_size,
                                       prompt_style=cfg.data.prompt_style, think=cfg.data.think)
        samples = load_samples(cfg.data.train_path, task=cfg.data.task, on_bad_row=cfg.data.on_bad_row,
                               image_root=cfg.data.image_root)
        if dist.get_rank() == 0:
            print(f"training set {cfg.data.train_path}: {len(samples.samples)} samples"
                  + (f", {samples.skipped} bad rows skipped (first: {samples.skipped_reasons[:3]})" if samples.skipped else ""),
                  flush=True)
        self.feed = PromptFeed(samples.samples, prompts_per_step=cfg.data.prompts_per_step,
                               dp_rank=parallel_state.get_data_parallel_rank(),
                               dp_size=parallel_state.get_data_parallel_world_size(), seed=cfg.train.seed,
                               shuffle=cfg.data.shuffle)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        if cfg.checkpoint.dir and cfg.checkpoint.resume:
            from .checkpointing import load_training_checkpoint

            state = load_training_checkpoint(cfg.checkpoint.dir, self.opt)
            if state is not None:
                self.step = state["step"]
                self.feed.consumed = state["consumed"]
                self.skipped_steps = state.get("skipped_steps", 0)
                if cfg.algorithm.gt_style == AUTO:  # an explicit style in the config always wins
                    self.gt_style = state.get("gt_style")
        self.logger = MetricsLogger(cfg.logging.dir, tensorboard=cfg.logging.tensorboard, jsonl=cfg.logging.jsonl,
                                    resume_from_step=self.step)

    # -- set-up ----------------------------------------------------------------------------------
    def _load_initial_weights(self, model) -> None:
        if self.cfg.model.megatron_path:
            load_model([model], resolve_checkpoint_dir(self.cfg.model.megatron_path))
        else:
            with open_hf_checkpoint(self.cfg.model.hf_path) as reader:
                load_hf_state_dict_into([model], reader)

    @property
    def chunks(self):
        return self.opt.model_chunks

    def sampling(self, step: int) -> SamplingConfig:
        # One seed per DP replica; the engine offsets it per call, and the call index is the step.
        dp_rank = parallel_state.get_data_parallel_rank()
        return SamplingConfig.from_config(self.cfg.rollout, seed=self.cfg.rollout.seed + 7919 * dp_rank)

    def _ensure_engine(self):
        """The rollout engine of this rank (built asleep on first use; collective with vLLM), or None on
        ranks that only take part in the weight sync (the transformers engine generates on model-parallel
        rank 0)."""
        if self.engine is None and (self.spmd_engine or experience.is_generating_rank()):
            self.engine = build_engine(self.cfg.rollout, self.cfg.model.hf_path, dtype=self.dtype)
            self.engine.sleep()
        return self.engine

    def sync_weights(self) -> None:
        """Collective over all ranks: stream the current weights into the engine (or just take part)."""
        self._ensure_engine()
        stream = export_hf_weights(self.chunks, bucket_bytes=self.cfg.rollout.bucket_mb * 2**20)
        if self.engine is None:
            for _ in stream:
                pass
            return
        self.engine.wake_up(tags=["weights"])
        self.engine.update_weights(stream)
        self.engine.wake_up(tags=["kv_cache"])

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, step, times = self.cfg, self.step, {}
        t0 = time.perf_counter()
        prompts = [self.preparer(s) for s in self.feed.next_batch()]
        completions = None
        if self.paradigm.needs_rollouts(step):
            self.sync_weights()
            times["sync"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            completions = experience.generate_rollouts(self.engine, prompts, self.sampling(step), spmd=self.spmd_engine,
                                                       call_index=step)
            if self.engine is not None:
                self.engine.sleep()
            times["generate"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        with_gt = self.paradigm.uses_gt_rows(step)
        if with_gt and cfg.algorithm.align_gt_style and self.gt_style is None:
            self._choose_gt_style(prompts)
            times["gt_style"] = time.perf_counter() - t2
        gt_style = self.gt_style if cfg.algorithm.align_gt_style else experience.UNALIGNED_GT_STYLE
        rows = experience.build_rows(prompts, completions, with_gt=with_gt, gt_style=gt_style,
                                     tokenizer=self.tokenizer, end_of_turn_id=self.end_of_turn_id,
                                     forbidden_ids=self.forbidden_ids)
        experience.score_rows(rows, prompts, self.reward_fn, gt_no_thinking=cfg.algorithm.gt_no_thinking_reward,
                              workers=cfg.train.reward_workers, timeout_s=cfg.train.reward_timeout_s)
        times["reward"] = time.perf_counter() - t2
        sums = MetricSums()
        self._reward_metrics(rows, sums)
        rewards, compare, correct = experience.reward_tensors(rows, cfg.algorithm.smooth_compare,
                                                              cfg.algorithm.hpt_correct_threshold)
        batch = RowBatch(torch.tensor(rewards, dtype=torch.float64), torch.tensor([r.prompt for r in rows]),
                         torch.tensor([r.is_gt for r in rows]), torch.tensor(correct),
                         None if compare is None else torch.tensor(compare, dtype=torch.float64))
        keep = torch.ones(len(rows), dtype=torch.bool)
        if cfg.algorithm.filter_groups:
            keep = filter_groups(batch.rewards, batch.group_index, batch.is_gt)
        info = self.paradigm.compute_row_info(batch, step)
        self._advantage_metrics(info, keep, sums)
        train_rows = [i for i in range(len(rows)) if keep[i] and info.active_rows[i]]
        self._rows_for_metrics = rows
        self._last_samples = [{"prompt": prompts[r.prompt].sample_id, "is_gt": r.is_gt, "text": r.text[:2000],
                               "reward": r.reward} for r in rows[: cfg.rollout.n + 1]]
        t3 = time.perf_counter()
        update = self._update(rows, prompts, train_rows, info, sums)
        times["update"] = time.perf_counter() - t3
        times["step"] = time.perf_counter() - t0
        for key, value in times.items():
            sums.set(f"time/{key}_s", value)
        if experience.is_generating_rank():
            tokens = sum(len(prompts[r.prompt].input_ids) + len(r.response_ids) for r in rows)
            sums.add("throughput/tokens_per_s", tokens / max(times["step"], 1e-9), 1)
        sums.set("lr", update["lr"])
        metrics = sums.reduce()
        # Mean over DP replicas above; the cluster's throughput is their sum.
        metrics["throughput/tokens_per_s"] *= parallel_state.get_data_parallel_world_size()
        metrics["skipped_steps"] = float(self.skipped_steps)
        return metrics

    def _choose_gt_style(self, prompts) -> None:
        """``gt_style: auto``: the candidate the current policy gives the highest teacher-forced
        log-prob on this step's prompts (``gt_style_choice``); every rank picks the same."""
        par = self.cfg.parallel
        scores = score_gt_styles(self.chunks, prompts, self.gt_style_candidates, tokenizer=self.tokenizer,
                                 end_of_turn_id=self.end_of_turn_id, image_token_id=self.extras.image_token_id,
                                 pad_id=self.pad_id, spatial_merge_size=self.extras.spatial_merge_size,
                                 micro_batch_size=self.cfg.train.micro_batch_size,
                                 max_tokens=self.cfg.train.max_tokens_per_micro_batch,
                                 seq_multiple=sequence_multiple(par.tp, par.sequence_parallel, bool(self.cfg.model.fp8)))
        self.gt_style = best_gt_style(scores)
        self.gt_style_scores = scores
        if dist.get_rank() == 0:
            table = ", ".join(f"{name} {score:.2f}" for name, score in scores.items())
            print(f"gt_style auto at step {self.step}: {self.gt_style} (mean GT log-prob: {table})", flush=True)

    def _reward_metrics(self, rows, sums: MetricSums) -> None:
        if not experience.is_generating_rank():
            return  # every rank of a replica holds the same rows: count them once
        for row in rows:
            prefix = "reward_gt" if row.is_gt else "reward"
            for term, value in row.reward.items():
                sums.add(f"{prefix}/{term}", value)
            if not row.is_gt:
                sums.add("response_length", len(row.response_ids))
                sums.add("response_clipped_frac", float(row.finish_reason == "length"))
                sums.add("response_cut_frac", float(row.finish_reason == "cut"))

    def _advantage_metrics(self, info, keep, sums: MetricSums) -> None:
        if not experience.is_generating_rank():
            return
        for key, value in info.metrics.items():
            sums.add(key, float(value))
        sums.add("filter/kept_frac", float(keep.float().mean()))

    def _update(self, rows, prompts, train_rows, info, sums: MetricSums) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.train.lr, cfg.train.lr_warmup_steps)
        set_lr(self.opt.optimizer, lr)
        if not train_rows:  # every group filtered: keep the collectives aligned with a zero-mask row
            train_rows, dummy = [0], True
        else:
            dummy = False
        multiple = sequence_multiple(cfg.parallel.tp, cfg.parallel.sequence_parallel, bool(cfg.model.fp8))
        length = padded_length([rows[i] for i in train_rows], prompts, multiple)
        mini_batches = [train_rows[i::cfg.train.mini_batches_per_step] for i in range(cfg.train.mini_batches_per_step)]
        mini_batches = [m for m in mini_batches if m] or [train_rows]
        several_updates = len(mini_batches) > 1 or cfg.train.epochs_per_batch > 1

        def build(indices):
            # Padded, or packed to the token budget (count agreed over DP); per-row width `length`
            # either way, so the loss and its normalisers see the same layout.
            return build_micro_batches(
                rows, indices, prompts, image_token_id=self.extras.image_token_id, pad_id=self.pad_id,
                spatial_merge_size=self.extras.spatial_merge_size, micro_batch_size=cfg.train.micro_batch_size,
                max_tokens=cfg.train.max_tokens_per_micro_batch, multiple=multiple, row_width=length,
                group=parallel_state.get_data_parallel_group(), share_vision=cfg.train.shared_vision_pass)

        old_logp = {}
        if several_updates:
            old_logp = self._old_logprobs(build(train_rows))
        first = True
        for _ in range(cfg.train.epochs_per_batch):
            for mini in mini_batches:
                micro = build(mini)
                self._layout_metrics(micro, rows, [] if dummy else mini, prompts, sums)
                if dummy:
                    for mb in micro:
                        mb.loss_mask.zero_()
                        mb.row_index.fill_(-1)
                self._optimizer_step(micro, info, old_logp, sums, log_rollout_stats=first)
                first = False
        return {"lr": lr}

    @staticmethod
    def _layout_metrics(micro, rows, indices, prompts, sums: MetricSums) -> None:
        """What an optimizer step's micro-batches cost: how many there are, and the share of their
        token positions that hold a row's token (the rest is padding, or filler micro-batches):
        the numbers to size ``train.max_tokens_per_micro_batch`` by."""
        if not experience.is_generating_rank():
            return  # once per DP replica
        sums.add("batch/micro_batches", len(micro))
        real = sum(row_length(rows[i], prompts) for i in indices)
        sums.add("batch/real_token_frac", real, sum(mb.input_ids.numel() for mb in micro))

    def _old_logprobs(self, micro) -> dict[int, torch.Tensor]:
        """Per-row [L] log-probs of the update's rows under the current (old) policy."""
        outputs = run_micro_batches(self.chunks, micro, lambda mb, logp, ent: (logp.sum() * 0, {"logp": logp.detach()}),
                                    forward_only=True, temperature=self.cfg.rollout.temperature or 1.0)
        old = {}
        for mb, out in zip(micro, outputs):
            for b, row in enumerate(mb.row_index.tolist()):
                if row >= 0:
                    old[row] = out["logp"][b]
        return old

    def _global_norms(self, micro) -> dict:
        """Aggregation denominators over the whole update (all micro-batches, all DP ranks).

        CPU float64 totals: the default group carries gloo for CPU tensors next to nccl
        (``runtime.distributed.process_group_backend``), and megatron's DP group inherits it."""
        totals: dict[str, torch.Tensor] = {}
        for mb in micro:
            for key, value in self.paradigm.normalisers(mb.loss_mask, mb.rows, self.step).items():
                totals[key] = totals.get(key, 0) + torch.as_tensor(value, dtype=torch.float64)
        if self.cfg.algorithm.loss_agg == "seq-mean-token-sum-norm":
            # That mode's denominator is the constant padded length, not a count: do not sum it.
            return {k: v / len(micro) for k, v in totals.items()}
        group = parallel_state.get_data_parallel_group()
        for key in sorted(totals):
            dist.all_reduce(totals[key], group=group)
        return totals

    def _optimizer_step(self, micro, info, old_logp, sums: MetricSums, *, log_rollout_stats: bool) -> None:
        cfg = self.cfg
        # The loss's row info and old log-probs ride with each micro-batch to the model's device.
        attach_rows(micro, info, old_logp)
        norms = self._global_norms(micro)
        # megatron divides each micro-batch loss by their number and DDP averages over DP ranks;
        # the loss below is already normalised globally, so undo both.
        scale = len(micro) * parallel_state.get_data_parallel_world_size()
        entropy_coef = cfg.algorithm.entropy_coef
        loss_fn = update_loss_fn(self.paradigm, norms, step=self.step, scale=scale, entropy_coef=entropy_coef)
        zero_grads(self.opt)
        # The entropy is always logged; it needs autograd only when it is part of the loss.
        outputs = run_micro_batches(self.chunks, micro, loss_fn, forward_only=False,
                                    temperature=cfg.rollout.temperature or 1.0, with_entropy=True,
                                    entropy_grad=bool(entropy_coef))
        for o in outputs:  # one device-to-host copy per micro-batch, after the schedule
            o["metrics"] = {k: float(v) for k, v in o["metrics"].items()}
        loss_value = sum(float(o["loss"]) for o in outputs) if outputs else 0.0
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            sums.add("loss", loss_value, 1)
            additive = {}
            for o in outputs:
                for k, v in o["metrics"].items():
                    if k == "loss" or "/" in k:  # the total is logged above; namespaced = batch stats
                        continue
                    if k in ADDITIVE_METRICS:  # globally normalised partial sums: add them up
                        additive[f"update/{k}"] = additive.get(f"update/{k}", 0.0) + v
                    else:
                        sums.add(f"update/{k}", v)
            for k, v in additive.items():
                sums.add(k, v, 1)
            if log_rollout_stats:
                self._logp_metrics(micro, outputs, sums)
        finite = torch.tensor([1.0 if math.isfinite(loss_value) else 0.0])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # the loss lives on the last stage only
        stepped, grad_norm = guarded_step(self.opt.optimizer, finite.item() == 1.0)
        sums.set("grad_norm", grad_norm)
        if not stepped:
            zero_grads(self.opt)
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            sums.set("nonfinite_step", 1.0)
            return
        self.nonfinite_in_a_row = 0

    def _logp_metrics(self, micro, outputs, sums: MetricSums) -> None:
        """Entropy, GT log-prob and the engine/trainer mismatch, on the rows' response tokens."""
        rows = self._rows_for_metrics
        for mb, out in zip(micro, outputs):
            mask = mb.loss_mask.bool().cpu()
            # On the host, next to the engine's log-probs and the CPU mask.
            logp = out["logp"].cpu()
            entropy = out["entropy"].cpu() if out["entropy"] is not None else None
            for b, r in enumerate(mb.row_index.tolist()):
                if r < 0:
                    continue
                m = mask[b]
                row = rows[r]
                if entropy is not None and not row.is_gt:
                    sums.add("entropy", float(entropy[b][m].sum()), float(m.sum()))
                if row.is_gt:
                    sums.add("gt_logp", float(logp[b][m].sum()), float(m.sum()))
                elif row.engine_logprobs:
                    train = logp[b][m]
                    engine = torch.tensor(row.engine_logprobs[: train.numel()], dtype=train.dtype)
                    n = engine.numel()
                    sums.add("token_mult_prob_error", token_mult_prob_error(engine, train[:n]) * n, n)

    # -- loop ------------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.step += 1
                if self.step % max(cfg.logging.log_every, 1) == 0 or self.step == cfg.train.steps:
                    self.logger.log(self.step, metrics)
                    self.logger.log_samples(self.step, self._last_samples)
                    if dist.get_rank() == 0:
                        print(format_metrics(self.step, metrics), flush=True)
                abort = self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps
                periodic = cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0
                if cfg.checkpoint.dir and (periodic or abort or self.step == cfg.train.steps):
                    from .checkpointing import save_training_checkpoint

                    save_training_checkpoint(cfg.checkpoint.dir, self.step, self.opt, train_state=self.train_state(),
                                             meta=self.checkpoint_meta(), keep_last=cfg.checkpoint.keep_last)
                if abort:
                    raise TrainingAborted(f"{self.nonfinite_in_a_row} non-finite steps in a row; checkpoint written")
        finally:
            self.logger.close()

    def close(self) -> None:
        """Close the logs and release the rollout engine (collective for the vLLM engine)."""
        self.logger.close()
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None

    def train_state(self) -> dict:
        return {"step": self.step, "consumed": self.feed.consumed, "skipped_steps": self.skipped_steps,
                "gt_style": self.gt_style}

    def checkpoint_meta(self) -> dict:
        # Layout and dtype are recorded by the checkpoint writer itself (from the model).
        return {"hf_config": self.hf_config, "hf_assets_src": self.cfg.model.hf_path,
                "paradigm": self.cfg.algorithm.paradigm}


def format_metrics(step: int, metrics: dict[str, float]) -> str:
    keys = ("reward/total", "reward_gt/total", "loss", "entropy", "grad_norm", "time/step_s")
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not math.isnan(metrics[k]))
    return f"step {step}: {shown}"
