"""The ViSurf trainer end to end on CPU: every paradigm, layout equivalence, exact resume."""
import json

import pytest

from tools.make_synthetic_grounding import generate
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from visurf_megatron.runtime.spawn import run_world

from .trainer_world import finite, run_steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    hf = make_tiny_checkpoint(root / "hf", seed=0)
    generate(root / "data", train=16, val=4, size=56, seed=0, no_object_fraction=0.25, progress=False)
    base = {
        "model": {"hf_path": str(hf), "dtype": "fp32", "spec": "local"},
        "parallel": {"tp": 1, "pp": 1},
        "rollout": {"engine": "hf", "n": 2, "max_new_tokens": 12},
        "data": {"train_path": str(root / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": 2},
        "train": {"steps": 2, "lr": 1.0e-3, "micro_batch_size": 3},
        "logging": {"dir": str(root / "logs"), "tensorboard": False},
    }
    return root, base


PARADIGMS = ["sft", "rlvr", "sft_then_rlvr", "visurf", "luffy", "chord", "hpt"]


def test_every_paradigm_runs_two_steps(setup):
    root, base = setup
    runs = [[f"algorithm.paradigm={p}", "algorithm.sft_then_rlvr_switch_step=1", f"logging.dir={root / p}"]
            for p in PARADIGMS]
    results = run_world(run_steps, 2, base, [["parallel.tp=2", *r] for r in runs], 2, timeout_s=600)[0]
    for paradigm, history in zip(PARADIGMS, results):
        assert len(history) == 2
        for metrics in history:
            assert finite(metrics["loss"]), (paradigm, metrics)
            assert finite(metrics["grad_norm"]), (paradigm, metrics)
            if "reward_gt/total" in metrics and paradigm != "hpt":
                # A GT row always carries signal; pure RL on a random policy may see equal rewards (A = 0).
                assert metrics["grad_norm"] > 0, (paradigm, metrics)
        has_rollouts = [("reward/total" in m) for m in history]
        has_gt = [("reward_gt/total" in m) for m in history]
        expected = {"sft": ([False, False], [True, True]), "rlvr": ([True, True], [False, False]),
                    "sft_then_rlvr": ([False, True], [True, False]), "visurf": ([True, True], [True, True]),
                    "luffy": ([True, True], [True, True]), "chord": ([True, True], [True, True]),
                    "hpt": ([True, True], [True, True])}[paradigm]
        assert (has_rollouts, has_gt) == expected, paradigm
    visurf = results[PARADIGMS.index("visurf")][0]
    for key in ("reward/total", "reward/thinking", "reward/answer_format", "reward/accuracy", "reward_gt/total",
                "reward_gt/thinking", "visurf/mean_adv_gt", "visurf/frac_groups_smoothed", "gt_logp", "entropy",
                "response_length", "token_mult_prob_error", "grad_norm", "update/clip_frac", "lr"):
        assert key in visurf and finite(visurf[key]), key
    assert visurf["reward_gt/thinking"] == 0.0  # control 2: no thinking reward for the GT row
    # fp32, same weights: the transformers engine and our megatron model agree per token.
    assert visurf["token_mult_prob_error"] < 1.01


def test_tp2_and_pp2_match_tp1(setup):
    root, base = setup
    tp1 = run_world(run_steps, 1, base, [[f"logging.dir={root / 'tp1'}"]], 1, timeout_s=300)[0][0]
    other = run_world(run_steps, 2, base, [["parallel.tp=2", f"logging.dir={root / 'tp2'}"],
                                           ["parallel.pp=2", f"logging.dir={root / 'pp2'}"]], 1, timeout_s=300)[0]
    for name, history in zip(("tp2", "pp2"), other):
        for key in ("loss", "grad_norm", "reward/total", "entropy", "gt_logp"):
            assert history[0][key] == pytest.approx(tp1[0][key], rel=1e-4, abs=1e-5), (name, key)


def _metrics_by_step(path):
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/"))}
    return out


def test_resume_reproduces_the_straight_run_exactly(setup):
    from .trainer_world import train_run

    root, base = setup
    straight, resumed = root / "straight", root / "resumed"
    common = ["parallel.tp=2", "train.steps=4", "checkpoint.save_every=2", "rollout.max_new_tokens=10"]
    run_world(train_run, 2, base, [*common, f"checkpoint.dir={straight}/ckpt", f"logging.dir={straight}/logs"],
              timeout_s=600)
    # Stop after 2 steps (as a kill after the step-2 checkpoint would), then start again: it resumes.
    run_world(train_run, 2, base, [*common, "train.steps=2", f"checkpoint.dir={resumed}/ckpt",
                                   f"logging.dir={resumed}/logs"], timeout_s=600)
    run_world(train_run, 2, base, [*common, f"checkpoint.dir={resumed}/ckpt", f"logging.dir={resumed}/logs"],
              timeout_s=600)
    a, b = _metrics_by_step(straight / "logs" / "metrics.jsonl"), _metrics_by_step(resumed / "logs" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == b[step], f"step {step} differs after resume"
    assert (resumed / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_nonfinite_steps_are_skipped_then_abort_with_a_checkpoint(setup):
    from visurf_megatron.runtime.spawn import RankFailure

    from .trainer_world import train_run

    root, base = setup
    run = root / "nan"
    # A real blow-up, no fake: lr 1e30 sends the weights to ~1e30 after one step, the next forward
    # overflows, and every later loss is non-finite.
    overrides = ["parallel.tp=2", "algorithm.paradigm=sft", "train.lr=1e30", "train.steps=8",
                 "train.max_nonfinite_steps=2", f"checkpoint.dir={run}/ckpt", f"logging.dir={run}/logs"]
    with pytest.raises(RankFailure, match="TrainingAborted: 2 non-finite steps in a row"):
        run_world(train_run, 2, base, overrides, timeout_s=600)
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["skipped_steps"] == 0 and records[-1]["skipped_steps"] == 2
    assert records[-1].get("nonfinite_step") == 1.0
    # The abort wrote a checkpoint first, and it names the last completed step.
    assert (run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_visurf_steps_on_a_tiny_qwen2_vl(setup):
    """The other family (issue 22) through the same trainer, by its checkpoint's model_type: rollouts
    from transformers' Qwen2VLForConditionalGeneration with synced weights, ViSurf updates on the
    megatron model at TP2 and TP1, the same numbers."""
    root, base = setup
    hf = make_tiny_checkpoint(root / "hf_qwen2_vl", seed=0, family="qwen2_vl")
    cfg = {**base, "model": {**base["model"], "hf_path": str(hf)}}
    tp2 = run_world(run_steps, 2, cfg, [["parallel.tp=2", "algorithm.paradigm=visurf",
                                         f"logging.dir={root / 'qwen2_vl_tp2'}"]], 2, timeout_s=600)[0][0]
    tp1 = run_world(run_steps, 1, cfg, [["algorithm.paradigm=visurf", f"logging.dir={root / 'qwen2_vl_tp1'}"]],
                    1, timeout_s=300)[0][0]
    assert len(tp2) == 2
    for metrics in tp2:
        for key in ("loss", "grad_norm", "reward_gt/total", "gt_logp", "entropy"):
            assert finite(metrics[key]), (key, metrics)
        assert metrics["grad_norm"] > 0  # the GT row always carries signal
        # fp32, same weights: transformers' Qwen2-VL (the engine) and our megatron Qwen2-VL agree per token.
        assert metrics["token_mult_prob_error"] < 1.01, metrics
        print(f"qwen2_vl tp2 step: loss {metrics['loss']:.5f} grad_norm {metrics['grad_norm']:.4f} "
              f"token_mult_prob_error {metrics['token_mult_prob_error']:.6f}")
    for key in ("loss", "grad_norm", "reward/total", "entropy", "gt_logp"):
        assert tp2[0][key] == pytest.approx(tp1[0][key], rel=1e-4, abs=1e-5), key
