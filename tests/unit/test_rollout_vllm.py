"""rollout.vllm_engine on CPU: the pure translation helpers, and the engine's control flow against a
fake ``vllm`` module (fakes stand only at the GPU boundary: ``FakeLLM``, ``FakeWorker``, ...)."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from visurf_megatron.rollout.base import RolloutRequest, SamplingConfig, request_seed
from visurf_megatron.rollout.vllm_engine import (
    _load_weights_on_worker,
    completions_from_request_output,
    llm_kwargs,
    sampling_params_kwargs,
    vllm_prompt,
)

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>find it<|im_end|>\n<|im_start|>assistant\n"


def test_llm_kwargs_spmd_sleep_dummy_processed_logprobs(tmp_path):
    kw = llm_kwargs(tmp_path, tensor_parallel_size=2, gpu_memory_utilization=0.4, seed=3, max_model_len=4096,
                    max_images_per_prompt=2, mm_processor_kwargs={"max_pixels": 1003520}, extra={"enforce_eager": True})
    assert kw["model"] == kw["tokenizer"] == str(tmp_path)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 2 and kw["enable_sleep_mode"] is True and kw["load_format"] == "dummy"
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert kw["max_model_len"] == 4096 and kw["mm_processor_kwargs"] == {"max_pixels": 1003520}
    assert kw["enforce_eager"] is True and kw["seed"] == 3
    assert llm_kwargs(tmp_path, dtype=torch.bfloat16)["dtype"] == "bfloat16"
    with pytest.raises(ValueError):
        llm_kwargs(tmp_path, tensor_parallel_size=0)
    with pytest.raises(ValueError):
        llm_kwargs(tmp_path, gpu_memory_utilization=1.5)


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


class FakeModel(torch.nn.Module):
    """Stands for vLLM's Qwen2_5_VLForConditionalGeneration: ``load_weights`` consumes the stream."""

    def __init__(self):
        super().__init__()
        self.received = []

    def load_weights(self, weights):
        for name, tensor in weights:
            self.received.append((name, tensor.clone()))
        return {name for name, _ in self.received}


class FakeWorker:
    """Stands for vLLM's WorkerWrapperBase (``.worker.model_runner.model``)."""

    def __init__(self, model):
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))


def test_load_weights_runs_on_the_worker_model_lazily():
    model = FakeModel()
    produced = []

    def stream():
        for i in range(3):
            produced.append(i)
            yield f"model.layers.{i}.mlp.up_proj.weight", torch.full((2,), float(i))

    assert _load_weights_on_worker(FakeWorker(model), stream()) == 3
    assert [n for n, _ in model.received] == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    assert produced == [0, 1, 2]


class FakeLLM:
    """Stands for ``vllm.LLM`` (in-process, external_launcher): records what the engine asks of it."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = FakeModel()
        self.calls = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return SimpleNamespace(eos_token_id=11)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", getattr(method, "__name__", method)))
        return [method(FakeWorker(self.model), *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params))
        return [fake_request_output([(j, [20 + j, 11], [-0.1 * (j + 1), -0.2], "stop") for j in range(p["n"])])
                for p in sampling_params]


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: kw  # the engine only builds and passes them on
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [11, 10]}')
    FakeLLM.instances.clear()
    return tmp_path


def test_engine_drives_vllm_as_documented(fake_vllm, monkeypatch):
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(fake_vllm, tensor_parallel_size=1, seed=4, max_images_per_prompt=2)
    llm = FakeLLM.instances[-1]
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher" and llm.kwargs["seed"] == 4
    assert engine.stop_token_ids == (11, 10) and (engine.dp_rank, engine.dp_size) == (0, 1)
    requests = [RolloutRequest(PROMPT, [object()]), RolloutRequest("plain")]
    with pytest.raises(RuntimeError, match="never loaded"):
        engine.generate(requests, SamplingConfig(n=2))
    engine.update_weights(iter([("model.norm.weight", torch.ones(3)), ("visual.merger.ln_q.weight", torch.ones(2))]))
    assert [n for n, _ in llm.model.received] == ["model.norm.weight", "visual.merger.ln_q.weight"]
    assert llm.calls[-1] == ("reset_prefix_cache",)
    sampling = SamplingConfig(n=2, temperature=0.7, seed=9, stop_token_ids=(12,))
    groups = engine.generate(requests, sampling)
    _, prompts, params = llm.calls[-1]
    assert prompts[0]["multi_modal_data"]["image"] and "multi_modal_data" not in prompts[1]
    assert [p["seed"] for p in params] == [request_seed(9, 0, i, 2) for i in range(2)]
    assert params[0]["stop_token_ids"] == [11, 10, 12] and params[0]["logprobs"] == 0
    assert [len(g) for g in groups] == [2, 2] and groups[0][1].response_token_ids == (21, 11)
    engine.generate(requests, sampling)
    assert [p["seed"] for p in llm.calls[-1][2]] == [request_seed(9, 1, i, 2) for i in range(2)]
    # sleep / wake: level 2 by default discards weights -> update needed again.
    engine.sleep()
    assert llm.calls[-1] == ("sleep", 2)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.update_weights([])
    engine.wake_up(tags=["weights"])
    assert llm.calls[-1] == ("wake_up", ("weights",))
    engine.update_weights([("model.norm.weight", torch.ones(3))])
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(requests, sampling)
    engine.wake_up(tags=["kv_cache"])
    assert llm.calls[-1] == ("wake_up", ("kv_cache",))
    engine.generate(requests, sampling)
    engine.sleep(level=1)
    engine.wake_up()
    assert llm.calls[-1] == ("wake_up", ("weights", "kv_cache"))
    engine.generate(requests, sampling)  # level 1 kept the weights


def test_engine_refuses_multiprocessing_and_bad_tp(fake_vllm, monkeypatch):
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        VLLMRolloutEngine(fake_vllm)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMRolloutEngine(fake_vllm, sleep_level=3)


def test_module_imports_without_vllm():
    import subprocess

    code = ("import sys; import visurf_megatron.rollout.vllm_engine, visurf_megatron.rollout.hf_engine; "
            "assert 'vllm' not in sys.modules, 'vllm imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_from_rollout_config(fake_vllm):
    from visurf_megatron.config import RolloutConfig
    from visurf_megatron.rollout import VLLMRolloutEngine, build_engine

    engine = build_engine(RolloutConfig(engine="vllm", tp=1, gpu_memory_utilization=0.35, seed=8), fake_vllm)
    assert isinstance(engine, VLLMRolloutEngine)
    kwargs = FakeLLM.instances[-1].kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["seed"]) == (1, 0.35, 8)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        build_engine(SimpleNamespace(engine="sglang"), fake_vllm)
