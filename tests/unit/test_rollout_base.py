"""rollout.base / rollout.sync pure parts: sampling config, requests, seeds, stop trimming, the
mismatch metric and the bucket planner."""
from __future__ import annotations

import math

import pytest
import torch

from visurf_megatron.config import RolloutConfig
from visurf_megatron.rollout.base import (
    Completion,
    EngineState,
    RolloutEngine,
    RolloutRequest,
    SamplingConfig,
    request_seed,
    trim_at_stop,
)
from visurf_megatron.rollout.sync import ParamPlan, plan_buckets, token_mult_prob_error


def test_sampling_config_from_rollout_config():
    cfg = RolloutConfig(n=4, temperature=0.9, top_p=0.95, top_k=20, max_new_tokens=64, seed=7)
    s = SamplingConfig.from_config(cfg, stop_token_ids=[5, 6])
    assert (s.n, s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed) == (4, 0.9, 0.95, 20, 64, 7)
    assert s.stop_token_ids == (5, 6) and not s.greedy and s.logprob_temperature == 0.9
    assert SamplingConfig.from_config(cfg, n=1, temperature=0.0).greedy
    assert SamplingConfig(temperature=0.0).logprob_temperature == 1.0


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_new_tokens=0), dict(temperature=0.0, n=2)])
def test_sampling_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_request_counts_image_placeholders():
    prompt = "<|vision_start|><|image_pad|><|vision_end|>where?"
    assert RolloutRequest(prompt, [object()]).images and isinstance(RolloutRequest(prompt, [object()]).images, tuple)
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 0 images"):
        RolloutRequest(prompt)
    with pytest.raises(ValueError):
        RolloutRequest("")


def test_completion_checks_lengths_and_reason():
    Completion((1,), (2, 3), "x", (-0.1, -0.2), "stop")
    with pytest.raises(ValueError):
        Completion((1,), (2, 3), "x", (-0.1,), "stop")
    with pytest.raises(ValueError):
        Completion((1,), (2,), "x", (-0.1,), "abort")


def test_request_seeds_are_distinct_per_sample_and_call():
    n, seeds = 4, set()
    for call in range(3):
        for i in range(50):
            s = request_seed(123, call, i, n)
            seeds.update(s + j for j in range(n))
    assert len(seeds) == 3 * 50 * n
    assert request_seed(None, 0, 0, 4) is None
    assert request_seed(1, 2, 3, 4) == request_seed(1, 2, 3, 4)


def test_trim_at_stop():
    assert trim_at_stop([5, 6, 2, 9, 9], [2, 3], 5) == ([5, 6, 2], "stop")
    assert trim_at_stop([5, 6, 7], [2], 3) == ([5, 6, 7], "length")
    assert trim_at_stop([3], [3], 4) == ([3], "stop")
    assert trim_at_stop([5, 6, 7, 2], [2], 3) == ([5, 6, 7], "length")  # stop beyond the budget


def test_token_mult_prob_error():
    a = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    assert token_mult_prob_error(a, a) == 1.0
    b = a.clone()
    b[0, 0] += 0.1
    b[1, 2] -= 5.0  # masked out below
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = (math.exp(0.1) + 4) / 5
    assert token_mult_prob_error(a, b, mask) == pytest.approx(expected)
    assert token_mult_prob_error([-1.0, -2.0], [-2.0, -1.0]) == pytest.approx(math.e)
    assert math.isnan(token_mult_prob_error(a, b, torch.zeros_like(mask)))
    with pytest.raises(ValueError):
        token_mult_prob_error(a, b[:1])


def _plan(i, shard, gathered=True, hf=None):
    return ParamPlan(i, f"p{i}", shard, gathered, hf or ((f"hf{i}", (shard[0] * 2,) + shard[1:]),))


def test_plan_buckets_bound_sizes_and_split_dtypes():
    params = [_plan(i, (8, 4)) for i in range(10)] + [_plan(10, (64, 64)), _plan(11, (2,), gathered=False, hf=(("n", (2,)),))]
    dtypes = ["float32"] * 11 + ["bfloat16"]
    buckets = plan_buckets(params, dtypes, stage=0, tp_size=2, bucket_bytes=1024)
    assert [p.index for b in buckets for p in b.params] == list(range(12)), "order kept, nothing lost"
    largest = max(b.nbytes for b in buckets)
    assert largest == 64 * 64 * 2 * 4  # the single oversized parameter gets a bucket of its own
    assert all(b.nbytes <= 1024 for b in buckets if len(b.params) > 1)
    assert {b.dtype for b in buckets if 11 in [p.index for p in b.params]} == {"bfloat16"}
    # 8x4 fp32 shards gathered over 2 ranks = 256 bytes each: four fit in 1 KiB.
    assert [len(b.params) for b in buckets][:3] == [4, 4, 2]
    assert len(plan_buckets(params, dtypes, stage=0, tp_size=2, bucket_bytes=1 << 30)) == 2  # one per dtype
    with pytest.raises(ValueError):
        plan_buckets(params, dtypes, stage=0, tp_size=2, bucket_bytes=0)


def test_engine_state_machine():
    state = EngineState()
    with pytest.raises(RuntimeError, match="never loaded"):
        state.require_ready()
    state.weights_stale = False
    state.require_ready()
    state.asleep = {"kv_cache"}
    with pytest.raises(RuntimeError, match="asleep"):
        state.require_ready()
    assert state.check_tags(None) == ("weights", "kv_cache")
    with pytest.raises(ValueError, match="unknown wake_up tags"):
        state.check_tags(["weight"])


def test_engines_satisfy_the_protocol():
    import inspect

    from visurf_megatron.rollout.hf_engine import HFRolloutEngine
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    for cls in (HFRolloutEngine, VLLMRolloutEngine):
        for method in ("update_weights", "generate", "sleep", "wake_up"):
            params = list(inspect.signature(getattr(cls, method)).parameters)
            expected = list(inspect.signature(getattr(RolloutEngine, method)).parameters)
            assert params[: len(expected)] == expected, f"{cls.__name__}.{method}{params} != protocol {expected}"
