"""Rank functions for the megatron Qwen2.5-VL tests (module-level so ``spawn`` can import them)."""
from __future__ import annotations

import torch


def build_model(hf_dir, tp, pp, sp, seed=11):
    from megatron.core import parallel_state

    from visurf_megatron.checkpoint.hf_import import load_hf_state_dict_into
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel
    from visurf_megatron.runtime import setup_model_parallel

    setup_model_parallel(tp=tp, pp=pp, sequence_parallel=sp, seed=seed)
    lang, vis, extras = configs_from_hf(hf_dir, ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp))
    model = Qwen25VLModel(lang, vis, extras)
    with open_hf_checkpoint(hf_dir) as tensors:
        load_hf_state_dict_into([model], tensors)
    return model, extras, parallel_state


def run_pipeline(model, extras, batch, *, forward_only, pp_state):
    """One micro-batch through the real schedule; returns gathered logits (last stage) or None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from visurf_megatron.models.qwen2_5_vl.model import gather_vocab_logits
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids

    input_ids = batch["input_ids"]
    position_ids, _ = mrope_position_ids(
        input_ids, batch["image_grid_thw"], image_token_id=extras.image_token_id,
        spatial_merge_size=extras.spatial_merge_size, attention_mask=batch["attention_mask"],
    )
    mask = batch["attention_mask"].float()
    labels = torch.roll(input_ids, -1, dims=1)

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(input_ids, position_ids, batch["pixel_values"], batch["image_grid_thw"])

        def loss_func(logits):
            # A real vocab-parallel loss over the non-pad tokens, and the full logits for comparison.
            from megatron.core import tensor_parallel

            full = gather_vocab_logits(logits, extras.vocab_size).detach().clone()
            # megatron's cross entropy works in place on fp32 logits, hence the clone above.
            logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
            loss = -(logp * mask).sum() / mask.sum()
            return loss, {"logits": full}

        return out, loss_func

    model.zero_grad(set_to_none=True)
    data = iter([None])
    seq = input_ids.shape[1]
    result = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=1,
        seq_length=seq, micro_batch_size=input_ids.shape[0], forward_only=forward_only,
    )
    if pp_state.is_pipeline_last_stage():
        return result[0]["logits"]
    return None


def grad_summary(model):
    out = {}
    for name, p in model.named_parameters():
        tower = "vision" if name.startswith("vision_model.") else "language"
        entry = out.setdefault(tower, {"finite": True, "nonzero": 0, "total": 0})
        entry["total"] += 1
        if p.grad is not None:
            entry["finite"] &= bool(torch.isfinite(p.grad).all())
            entry["nonzero"] += int(p.grad.abs().sum() > 0)
    return out


def parity_world(hf_dirs, batches, layouts):
    """For each checkpoint and layout: logits (forward only), grads (forward+backward), HF round trip."""
    from visurf_megatron.checkpoint.hf_import import load_hf_state_dict_into
    from visurf_megatron.checkpoint.mapping import gather_hf_state_dict, inmemory_name
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids

    results = []
    for kind, hf_dir in hf_dirs.items():
        with open_hf_checkpoint(hf_dir) as reader:
            original = {k: reader[k] for k in reader.keys()}
        for tp, pp, sp in layouts:
            model, extras, ps = build_model(hf_dir, tp, pp, sp)
            model.eval()
            logits = run_pipeline(model, extras, batches[kind], forward_only=True, pp_state=ps)
            model.train()
            run_pipeline(model, extras, batches[kind], forward_only=False, pp_state=ps)
            grads = grad_summary(model)
            logp = None
            if pp == 1:
                b = batches[kind]
                pos, _ = mrope_position_ids(b["input_ids"], b["image_grid_thw"], image_token_id=extras.image_token_id,
                                            spatial_merge_size=extras.spatial_merge_size, attention_mask=b["attention_mask"])
                with torch.no_grad():
                    logp = model(b["input_ids"], pos, b["pixel_values"], b["image_grid_thw"],
                                 labels=torch.roll(b["input_ids"], -1, dims=1))
            mismatched, extra = [], []
            # Both HF key namings load; the export is always the Hub naming, bit-identical.
            for naming in ("hub", "inmemory"):
                source = original if naming == "hub" else {inmemory_name(k): v for k, v in original.items()}
                load_hf_state_dict_into([model], source)
                gathered = gather_hf_state_dict([model])
                mismatched += [f"{naming}:{k}" for k in sorted(original) if k not in gathered or not torch.equal(gathered[k], original[k])]
                extra += [f"{naming}:{k}" for k in sorted(set(gathered) - set(original))]
            results.append({"kind": kind, "layout": (tp, pp, sp), "logits": logits, "grads": grads, "logp": logp,
                            "roundtrip_mismatch": mismatched, "roundtrip_extra": extra,
                            "has_vision": model.vision_model is not None, "family": extras.model_type})
    return results


def streamed_save_world(hf_dir, out_dir, tp):
    """Save a model filled lazily from HF (StreamedHFParams) with a pool of one parameter's size;
    report what was read, the memory the stream held at most, and compare the reloaded model."""
    from visurf_megatron.checkpoint.hf_import import StreamedHFParams, check_hf_tensors, load_hf_state_dict_into
    from visurf_megatron.checkpoint.mapping import resolve_params
    from visurf_megatron.checkpoint.transforms import MappingContext, Replicated
    from visurf_megatron.checkpoint.megatron_io import build_model as build_bare, load_model, save_model
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.models.qwen2_5_vl.config import load_hf_config
    from visurf_megatron.runtime import setup_model_parallel

    setup_model_parallel(tp=tp, pp=1)
    config = load_hf_config(hf_dir).to_dict()
    model, extras = build_bare(config, tp, 1, torch.float32)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    with open_hf_checkpoint(hf_dir) as reader:
        stream = StreamedHFParams(check_hf_tensors([model], reader), reader, MappingContext.from_extras(extras),
                                  pool_bytes=max(sizes))
        save_model([model], out_dir, sync_files=False, stream=stream)
        # Not read: what this rank does not save (a TP-replicated tensor is saved by TP rank 0 only).
        read = set(stream.read_names())
        unread = [(r.global_name, isinstance(r.mapping.transform, Replicated))
                  for r, _ in resolve_params([model]) if r.global_name not in read]
        reference, _ = build_bare(config, tp, 1, torch.float32)
        load_hf_state_dict_into([reference], reader)
    reloaded, _ = build_bare(config, tp, 1, torch.float32)
    load_model([reloaded], out_dir)
    different = [n for (n, a), b in zip(reference.named_parameters(), reloaded.parameters()) if not torch.equal(a, b)]
    return {"unread": unread, "different": different, "peak": stream.pool.peak, "largest": max(sizes),
            "total": sum(sizes)}


def equal_images_vision_world(hf_dir, batch):
    """Vision tower on images of one size (every window and image region the same length): the
    batched regions and the block-diagonal mask, outputs and parameter gradients, TP1."""
    model, _, _ = build_model(hf_dir, 1, 1, False)
    tower = model.vision_model
    out = {}
    for batched in (True, False):
        tower.batch_equal_regions = batched
        tower.zero_grad(set_to_none=True)
        merged = tower(batch["pixel_values"], batch["image_grid_thw"])
        weights = torch.linspace(-1, 1, merged.numel()).view_as(merged)
        (merged * weights).sum().backward()
        out[batched] = {"merged": merged.detach(),
                        "grads": {n: p.grad.detach().clone() for n, p in tower.named_parameters() if p.grad is not None},
                        "n_params": sum(1 for _ in tower.parameters())}
    return out
