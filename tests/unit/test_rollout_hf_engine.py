"""rollout.hf_engine on a tiny checkpoint: weights only through update_weights (both HF namings),
greedy == transformers' own from_pretrained + generate, log-probs == log_softmax(logits / T) of a
teacher-forced forward, seeds, stop handling, sleep / wake; plus the processor helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visurf_megatron.checkpoint.mapping import inmemory_name
from visurf_megatron.rollout.base import RolloutRequest, SamplingConfig
from visurf_megatron.rollout.hf_engine import HFRolloutEngine, completions_from_generate, hf_generation_kwargs
from visurf_megatron.rollout.processor import checkpoint_stop_token_ids, load_processor, merged_stop_token_ids

NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("hfeng") / "untied", seed=5, init_std=0.2, vocab_size=500)


@pytest.fixture(scope="module")
def weights(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module")
def engine(ckpt, weights):
    e = HFRolloutEngine(ckpt, device="cpu")
    e.update_weights(weights.items())
    return e


@pytest.fixture(scope="module")
def requests(ckpt):
    processor = load_processor(ckpt)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    chat = lambda c: processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)  # noqa: E731
    return [RolloutRequest(chat([{"type": "image"}, {"type": "text", "text": "find the red circle"}]), [image]),
            RolloutRequest(chat("answer in JSON"))]


def test_processor_helpers(ckpt):
    import tools.make_tiny_checkpoint as tool
    from visurf_megatron.rollout import processor as pkg

    assert tool.load_processor is pkg.load_processor  # moved, not copied
    proc = load_processor(ckpt)
    stops = checkpoint_stop_token_ids(ckpt, proc.tokenizer)
    im_end, eot = proc.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stops == (im_end, eot)
    assert merged_stop_token_ids(stops, (eot, 7)) == (im_end, eot, 7)


def test_generation_kwargs_turn_every_default_off():
    kw = hf_generation_kwargs(SamplingConfig(n=3, temperature=0.6, top_k=-1, max_new_tokens=9), [5, 6], 1)
    assert kw["do_sample"] and kw["top_k"] == 0 and kw["top_p"] == 1.0 and kw["temperature"] == 0.6
    assert kw["num_return_sequences"] == 3 and kw["repetition_penalty"] == 1.0 and kw["eos_token_id"] == [5, 6]
    assert kw["output_logits"] and kw["return_dict_in_generate"] and kw["max_new_tokens"] == 9
    assert not hf_generation_kwargs(SamplingConfig(temperature=0.0), [5], 1)["do_sample"]


def test_completions_from_generate_logprobs_are_log_softmax_at_temperature():
    torch.manual_seed(0)
    logits = [torch.randn(2, 7) for _ in range(3)]
    sequences = torch.tensor([[9, 9, 1, 4, 2], [9, 9, 3, 2, 0]])  # prompt 2 tokens; stop id 2
    out = completions_from_generate(sequences, logits, [9, 9], stop_token_ids=[2], max_new_tokens=3,
                                    temperature=0.5, decode=lambda ids: ",".join(map(str, ids)))
    assert out[0].response_token_ids == (1, 4, 2) and out[0].finish_reason == "stop"
    assert out[1].response_token_ids == (3, 2) and out[1].text == "3,2"
    expected = torch.log_softmax(logits[1][1] / 0.5, -1)[2].item()
    assert out[1].logprobs[1] == pytest.approx(expected, abs=1e-6)


def test_weights_only_through_update_weights_in_either_naming(ckpt, weights, requests, engine):
    fresh = HFRolloutEngine(ckpt, device="cpu")
    with pytest.raises(RuntimeError, match="never loaded"):
        fresh.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=2))
    fresh.update_weights((inmemory_name(k), v) for k, v in weights.items())  # model.language_model.* naming
    assert fresh.missing_weights == []
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW)
    assert fresh.generate(requests, greedy) == engine.generate(requests, greedy)
    with pytest.raises(KeyError, match="not a tensor"):
        fresh.update_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        fresh.update_weights([("model.norm.weight", torch.zeros(3))])


def test_greedy_equals_from_pretrained_generate(ckpt, engine, requests):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(ckpt)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    got = engine.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=NEW))
    for request, (completion,) in zip(requests, got):
        enc = processor(text=[request.prompt], images=list(request.images) or None, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=False, max_new_tokens=NEW)
        ref = seq[0, enc["input_ids"].shape[1]:].tolist()
        assert list(completion.prompt_token_ids) == enc["input_ids"][0].tolist()
        assert list(completion.response_token_ids) == ref[: len(completion.response_token_ids)]
        if completion.finish_reason == "stop":
            assert completion.response_token_ids[-1] in engine.stop_token_ids
        else:
            assert len(completion.response_token_ids) == NEW


def test_sampled_logprobs_match_teacher_forced_forward(engine, requests):
    sampling = SamplingConfig(n=3, temperature=0.7, max_new_tokens=NEW, seed=3)
    groups = engine.generate(requests, sampling)
    assert [len(g) for g in groups] == [3, 3]
    assert len({c.response_token_ids for c in groups[0]}) > 1, "n samples should differ"
    request, completion = requests[0], groups[0][0]
    enc = engine.processor(text=[request.prompt], images=list(request.images), return_tensors="pt")
    ids = torch.tensor([list(completion.prompt_token_ids) + list(completion.response_token_ids)])
    extra = {}
    if "mm_token_type_ids" in enc:  # transformers 5 places the image rope positions with it
        pad = torch.zeros(1, len(completion.response_token_ids), dtype=enc["mm_token_type_ids"].dtype)
        extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], pad], dim=1)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                              image_grid_thw=enc["image_grid_thw"], **extra).logits[0].float()
    start = len(completion.prompt_token_ids) - 1
    ref = torch.log_softmax(logits / 0.7, -1)[start:start + len(completion.response_token_ids)]
    ref = ref.gather(-1, torch.tensor(completion.response_token_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(completion.logprobs), ref, atol=1e-4)


def test_seeds_are_deterministic_per_call(ckpt, weights, requests, engine):
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6, seed=21)
    other = HFRolloutEngine(ckpt, device="cpu")
    other.update_weights(weights.items())
    other.calls = engine.calls
    torch.manual_seed(0)
    a = engine.generate(requests, sampling)
    after_generate = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_generate), "generate forks the RNG: the trainer's stream is untouched"
    b = other.generate(requests, sampling)
    assert a == b, "same seed and call index -> same rollouts"
    c = engine.generate(requests, sampling)
    assert [g[0].response_token_ids for g in c] != [g[0].response_token_ids for g in a], "next call, new seeds"


def test_extra_stop_tokens_and_length(engine, requests):
    first = engine.generate(requests[:1], SamplingConfig(temperature=0.0, max_new_tokens=NEW))[0][0]
    token = first.response_token_ids[0]
    stopped = engine.generate(requests[:1], SamplingConfig(temperature=0.0, max_new_tokens=NEW, stop_token_ids=(token,)))[0][0]
    assert stopped.response_token_ids == (token,) and stopped.finish_reason == "stop"
    short = engine.generate(requests[:1], SamplingConfig(temperature=0.0, max_new_tokens=1))[0][0]
    assert short.response_token_ids == (token,) and short.finish_reason in ("length", "stop")
    if token not in engine.stop_token_ids:
        assert short.finish_reason == "length"


def test_sleep_and_wake(ckpt, weights, requests):
    e = HFRolloutEngine(ckpt, device="cpu")
    e.update_weights(weights.items())
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW)
    ref = e.generate(requests, greedy)
    e.sleep()  # level 1 on CPU: nothing moves, generation refused until woken
    with pytest.raises(RuntimeError, match="asleep"):
        e.generate(requests, greedy)
    e.wake_up()
    assert e.generate(requests, greedy) == ref
    e.sleep(level=2)
    assert e.model.lm_head.weight.device.type == "meta"
    with pytest.raises(RuntimeError, match="asleep"):
        e.update_weights(weights.items())
    with pytest.raises(ValueError, match="unknown wake_up tags"):
        e.wake_up(tags=["weight"])
    e.wake_up(tags=["weights"])
    e.update_weights((k, v) for k, v in weights.items() if "lm_head" not in k)
    with pytest.raises(RuntimeError, match="lm_head"):
        e.generate(requests, greedy)  # a partial reload is refused, naming what is missing
    e.update_weights([("lm_head.weight", weights["lm_head.weight"])])
    with pytest.raises(RuntimeError, match="asleep"):
        e.generate(requests, greedy)  # kv_cache not woken yet
    e.wake_up(tags=["kv_cache"])
    assert e.generate(requests, greedy) == ref


def test_tied_checkpoint_needs_no_lm_head(tmp_path):
    from safetensors.torch import load_file

    from tools.make_tiny_checkpoint import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path / "tied", seed=5, tied=True, init_std=0.2)
    weights = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in weights
    e = HFRolloutEngine(d, device="cpu")
    e.update_weights(weights.items())
    assert e.missing_weights == []
    assert torch.equal(e.model.lm_head.weight, weights["model.embed_tokens.weight"])
    e.sleep(level=2)
    e.wake_up()
    e.update_weights(weights.items())
    assert torch.equal(e.model.lm_head.weight, weights["model.embed_tokens.weight"]), "tie restored after level 2"


def test_the_model_class_follows_model_type_and_others_are_refused_by_name(tmp_path):
    """Issue 22: Qwen2-VL by its model_type, no flag; a model_type of no supported family (here a Qwen3-VL
    config, which transformers would happily load) is refused by name before any weight is built."""
    import json

    from tools.make_tiny_checkpoint import make_tiny_checkpoint
    from visurf_megatron.rollout.processor import build_processor

    qwen2 = make_tiny_checkpoint(tmp_path / "qwen2_vl", seed=1, family="qwen2_vl")
    engine = HFRolloutEngine(qwen2, device="cpu")
    assert type(engine.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(engine.processor).__name__ == "Qwen2VLProcessor"
    with pytest.raises(KeyError, match="not a tensor of Qwen2VLForConditionalGeneration"):
        engine.update_weights([("visual.blocks.0.mlp.gate_proj.weight", torch.zeros(1))])  # Qwen2.5-VL's name
    processor = build_processor(engine.processor.tokenizer, engine.processor.image_processor, model_type="qwen2_vl")
    assert type(processor).__name__ == "Qwen2VLProcessor"
    other = tmp_path / "qwen3_vl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(ValueError, match="unsupported model_type='qwen3_vl': supported are qwen2_5_vl, qwen2_vl"):
        HFRolloutEngine(other, device="cpu")
    with pytest.raises(ValueError, match="unsupported model_type='qwen3_vl'"):
        build_processor(engine.processor.tokenizer, engine.processor.image_processor, model_type="qwen3_vl")
