"""Rank functions for the weight-sync tests (module-level so ``spawn`` can import them).

One world runs many scenarios (checkpoints x layouts x bucket sizes) and returns small summaries
(names, mismatches, counters), never the tensors.
"""
from __future__ import annotations

import torch


def _read_checkpoint(hf_dir):
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint

    with open_hf_checkpoint(hf_dir) as reader:
        return {k: reader[k] for k in reader.keys()}


def _check_stream(stream, original):
    """(names in order, shape list, mismatching names) of a stream against the original checkpoint."""
    names, shapes, mismatched = [], [], []
    for name, tensor in stream:
        names.append(name)
        shapes.append(tuple(tensor.shape))
        ref = original.get(name)
        if ref is None or ref.dtype != tensor.dtype or ref.shape != tensor.shape or not torch.equal(ref, tensor):
            mismatched.append(name)
    return names, shapes, mismatched


def export_world(hf_dirs, layouts, bucket_sizes):
    """For each checkpoint and (tp, pp): stream at every bucket size, compare with the checkpoint."""
    from visurf_megatron.checkpoint.mapping import gather_hf_state_dict
    from visurf_megatron.rollout.sync import ExportStats, export_hf_weights, get_plan

    from .qwen_world import build_model

    results = []
    for kind, hf_dir in hf_dirs.items():
        original = _read_checkpoint(hf_dir)
        for tp, pp in layouts:
            model, extras, ps = build_model(hf_dir, tp, pp, False)
            chunks = [model]
            # The converter writes exactly gather_hf_state_dict: the stream must equal it too.
            converter = gather_hf_state_dict(chunks)
            runs = []
            for bucket_bytes in bucket_sizes:
                for attempt in range(2):  # the second export reuses the cached plan
                    stats = ExportStats()
                    names, shapes, mismatched = _check_stream(
                        export_hf_weights(chunks, bucket_bytes=bucket_bytes, stats=stats), original)
                    plan, _ = get_plan(chunks, bucket_bytes=bucket_bytes)
                    runs.append(dict(
                        bucket_bytes=bucket_bytes, attempt=attempt, names=names, shapes=shapes,
                        mismatched=mismatched, stats=vars(stats).copy(),
                        largest_tensor_bytes=plan.largest_tensor_bytes,
                        converter_mismatch=[n for n in converter if not torch.equal(converter[n], original.get(n, torch.empty(0)))],
                    ))
            # A rebuilt model (new chunks) gets a new plan.
            model2, _, _ = build_model(hf_dir, tp, pp, False)
            stats = ExportStats()
            names, _, mismatched = _check_stream(export_hf_weights([model2], bucket_bytes=bucket_sizes[0], stats=stats), original)
            runs.append(dict(bucket_bytes=bucket_sizes[0], attempt="rebuilt", names=names, mismatched=mismatched,
                             stats=vars(stats).copy()))
            results.append(dict(kind=kind, layout=(tp, pp), tp_rank=ps.get_tensor_model_parallel_rank(),
                                pp_rank=ps.get_pipeline_model_parallel_rank(), runs=runs))
    return results


def make_requests(prompts):
    """``RolloutRequest``s from ``[(chat-templated text, [(width, height), ...]), ...]`` with
    deterministic random images (the same in every process)."""
    import numpy as np
    from PIL import Image

    from visurf_megatron.rollout.base import RolloutRequest

    requests = []
    for index, (text, sizes) in enumerate(prompts):
        rng = np.random.default_rng(1000 + index)
        images = tuple(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes)
        requests.append(RolloutRequest(text, images))
    return requests


def _teacher_forced_logp(model, extras, processor, request, completion, temperature):
    """Per-token log-probs of ``completion``'s response under the megatron model (TP only, no PP)."""
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids

    enc = processor(text=[request.prompt], images=list(request.images) or None, return_tensors="pt")
    prompt = list(completion.prompt_token_ids)
    assert enc["input_ids"][0].tolist() == prompt, "engine and processor tokenised the prompt differently"
    ids = torch.tensor([prompt + list(completion.response_token_ids)])
    grid = enc.get("image_grid_thw")
    position_ids, _ = mrope_position_ids(ids, grid, image_token_id=extras.image_token_id,
                                         spatial_merge_size=extras.spatial_merge_size)
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        logp = model(ids, position_ids, enc.get("pixel_values"), grid, labels=labels, temperature=temperature)
    start = len(prompt) - 1
    return logp[0, start:start + len(completion.response_token_ids)].tolist()


def engine_world(hf_dir, layouts, prompts, greedy_tokens, sample_temperature, bucket_bytes):
    """Per layout: a transformers engine fed by the export stream; greedy and sampled rollouts; the
    megatron model's teacher-forced log-probs of the sampled responses (layouts without PP)."""
    from visurf_megatron.rollout.base import SamplingConfig
    from visurf_megatron.rollout.hf_engine import HFRolloutEngine
    from visurf_megatron.rollout.sync import ExportStats, refresh_engine_weights, token_mult_prob_error

    from .qwen_world import build_model

    requests = make_requests(prompts)
    out = []
    for tp, pp in layouts:
        model, extras, ps = build_model(hf_dir, tp, pp, False)
        model.eval()
        engine = HFRolloutEngine(hf_dir, device="cpu")
        stats = refresh_engine_weights(engine, [model], bucket_bytes=bucket_bytes, stats=ExportStats())
        greedy = engine.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=greedy_tokens))
        sampling = SamplingConfig(n=2, temperature=sample_temperature, max_new_tokens=greedy_tokens, seed=11)
        sampled = engine.generate(requests, sampling)
        errors, max_abs = [], 0.0
        if pp == 1:
            for request, group in zip(requests, sampled):
                for completion in group:
                    train = _teacher_forced_logp(model, extras, engine.processor, request, completion, sample_temperature)
                    errors.append(token_mult_prob_error(completion.logprobs, train))
                    max_abs = max(max_abs, max(abs(a - b) for a, b in zip(completion.logprobs, train)))
        # Sleep level 2 discards the weights: a fresh sync brings the same rollouts back.
        engine.sleep(level=2)
        refresh_engine_weights(engine, [model], bucket_bytes=bucket_bytes)
        again = engine.generate(requests, SamplingConfig(temperature=0.0, max_new_tokens=greedy_tokens))
        out.append(dict(
            layout=(tp, pp), stats=vars(stats).copy(),
            greedy=[[c.response_token_ids for c in g] for g in greedy],
            greedy_finish=[[c.finish_reason for c in g] for g in greedy],
            greedy_again=[[c.response_token_ids for c in g] for g in again],
            sampled=[[c.response_token_ids for c in g] for g in sampled],
            mult_errors=errors, max_abs_logp_diff=max_abs,
        ))
    return out


def sync_world(hf_dirs, layouts, bucket_sizes, engine_kind, prompts, new_tokens, temperature, engine_bucket_bytes):
    """Both scenario sets in one world (spawning worlds is the expensive part)."""
    return dict(
        export=export_world(hf_dirs, layouts, bucket_sizes),
        engine=engine_world(hf_dirs[engine_kind], layouts, prompts, new_tokens, temperature, engine_bucket_bytes),
    )
