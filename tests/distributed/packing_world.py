"""Rank functions for the packing tests: the same update, padded and packed, through the real schedule."""
from __future__ import annotations

import torch


def make_prompts(hf_dir):
    """Three prompts with 0, 1 and 2 images (different sizes), as ``PromptPreparer`` builds them."""
    import numpy as np
    from PIL import Image

    from tools.make_tiny_checkpoint import load_processor
    from visurf_megatron.training.batching import PreparedPrompt

    processor = load_processor(hf_dir)
    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    specs = [("count the things", []), ("find the red circle", [image(84, 56)]),
             ("compare these two", [image(56, 56), image(56, 112)])]
    prompts = []
    for k, (text, images) in enumerate(specs):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = processor(text=[chat], images=images or None, return_tensors="pt")
        prompts.append(PreparedPrompt(f"p{k}", chat, images, enc["input_ids"][0], enc.get("pixel_values"),
                                      enc.get("image_grid_thw")))
    return prompts


def make_rows(prompts, extras, group_size=3, seed=0):
    """``group_size`` rows per prompt (the last one the GT row) of spread response lengths."""
    from visurf_megatron.training.batching import Row

    gen = torch.Generator().manual_seed(seed)
    special = {extras.image_token_id, extras.video_token_id, extras.vision_start_token_id}
    rows = []
    for p in range(len(prompts)):
        for j in range(group_size):
            n = int(torch.randint(2, 40, (1,), generator=gen))
            ids = [t for t in torch.randint(3, 300, (n + 4,), generator=gen).tolist() if t not in special][:n]
            rows.append(Row(prompt=p, response_ids=ids, is_gt=j == group_size - 1))
    return rows


def _row_info(rows, paradigm):
    from visurf_megatron.algorithm.paradigms import RowBatch

    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(len(rows), generator=gen, dtype=torch.float64) * 3
    batch = RowBatch(rewards, torch.tensor([r.prompt for r in rows]), torch.tensor([r.is_gt for r in rows]))
    return paradigm.compute_row_info(batch, 0)


def _global_norms(paradigm, micro):
    """As ``Trainer._global_norms``: summed over micro-batches and data-parallel ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    totals = {}
    for mb in micro:
        for key, value in paradigm.normalisers(mb.loss_mask, mb.rows, 0).items():
            totals[key] = totals.get(key, 0) + torch.as_tensor(value, dtype=torch.float64)
    for key in sorted(totals):
        dist.all_reduce(totals[key], group=parallel_state.get_data_parallel_group())
    return totals


def _grads(model, ps):
    """Parameter gradients, sequence-parallel ones summed over TP (what megatron's finalisation does:
    each TP rank holds the share of its slice of the sequence, and the slices differ by layout)."""
    import torch.distributed as dist

    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().clone()
        if getattr(p, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        out[name] = g
    return out


def update(model, ps, micro, rows, info, paradigm, *, scale_dp):
    """One update's loss and gradients, each row's per-token log-probs (forward only), and the vision
    tower's passes (forward calls, images encoded) over both schedule runs."""
    from visurf_megatron.training.forward import run_micro_batches
    from visurf_megatron.training.update_loss import attach_rows, update_loss_fn

    passes = []
    vision = getattr(model, "vision_model", None)
    hook = vision.register_forward_hook(lambda mod, args, out: passes.append(int(args[1].shape[0]))) if vision else None
    attach_rows(micro, info)
    outputs = run_micro_batches([model], micro, lambda mb, logp, ent: (logp.sum() * 0, {"logp": logp.detach()}),
                                forward_only=True)
    logp = {}
    for mb, out in zip(micro, outputs):
        for b, r in enumerate(mb.row_index.tolist()):
            if r >= 0:
                logp[r] = out["logp"][b].clone()
    norms = _global_norms(paradigm, micro)
    loss_fn = update_loss_fn(paradigm, norms, step=0, scale=len(micro) * scale_dp, entropy_coef=0.0)
    model.zero_grad(set_to_none=True)
    outputs = run_micro_batches([model], micro, loss_fn, forward_only=False, with_entropy=True, entropy_grad=False)
    loss = sum(float(o["loss"]) for o in outputs) if outputs else None
    if hook is not None:
        hook.remove()
    return {"logp": logp, "loss": loss, "grads": _grads(model, ps), "vision_passes": passes}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def variant_micro_batches(rows, indices, prompts, extras, group, *, budget, multiple) -> dict:
    """The micro-batches of one update in each layout the packing tests compare: padded (2 rows
    each), packed with one vision pass per update, packed with one pass per micro-batch."""
    from visurf_megatron.training.packing import build_micro_batches

    common = dict(image_token_id=extras.image_token_id, pad_id=0, spatial_merge_size=extras.spatial_merge_size,
                  micro_batch_size=2, multiple=multiple, group=group)
    return {"padded": build_micro_batches(rows, indices, prompts, **common),
            "packed": build_micro_batches(rows, indices, prompts, max_tokens=budget, **common),
            "packed_own_vision": build_micro_batches(rows, indices, prompts, max_tokens=budget, share_vision=False,
                                                     **common)}


def packed_vs_padded(hf_dir, layouts, budget, dp_rows=None):
    """For each (tp, pp, sp): the same ViSurf update padded and packed. ``dp_rows[dp_rank]``: the rows
    this data-parallel rank trains on (default all), so ranks can hold different numbers of rows."""
    from visurf_megatron.algorithm.paradigms import get_paradigm
    from visurf_megatron.training.batching import sequence_multiple
    from visurf_megatron.training.packing import row_length

    from .qwen_world import build_model

    results = []
    for tp, pp, sp in layouts:
        model, extras, ps = build_model(hf_dir, tp, pp, sp)
        model.train()
        prompts = make_prompts(hf_dir)
        rows = make_rows(prompts, extras)
        paradigm = get_paradigm("visurf")
        info = _row_info(rows, paradigm)
        dp_rank = ps.get_data_parallel_rank()
        indices = list(range(len(rows))) if dp_rows is None else dp_rows[dp_rank]
        multiple = sequence_multiple(tp, sp, False)
        micro = variant_micro_batches(rows, indices, prompts, extras, ps.get_data_parallel_group(), budget=budget,
                                      multiple=multiple)
        dp = ps.get_data_parallel_world_size()
        results.append({
            "layout": (tp, pp, sp), "dp_rank": dp_rank, "last_stage": ps.is_pipeline_last_stage(),
            "lengths": {i: row_length(rows[i], prompts) for i in indices},
            "prompt_of": {i: rows[i].prompt for i in indices},
            "plan": [mb.row_index.tolist() for mb in micro["packed"]],
            "stream": tuple(micro["packed"][0].input_ids.shape),
            "multiple": multiple, "first_stage": ps.is_pipeline_first_stage(),
            "images": sum(int(prompts[p].image_grid_thw.shape[0])
                          for p in {rows[i].prompt for i in indices} if prompts[p].has_images),
            **{variant: update(model, ps, mbs, rows, info, paradigm, scale_dp=dp) for variant, mbs in micro.items()},
        })
    return results


def trainer_steps(base: dict, overrides: list[str], steps: int) -> dict:
    """``steps`` real trainer steps; each step's loss, the packed plans' shapes, and the parameters."""
    from .trainer_world import _config
    from visurf_megatron.training import trainer as trainer_module

    trainer = trainer_module.Trainer(_config(base, overrides))
    shapes = []
    build = trainer_module.build_micro_batches

    def recording(*args, **kwargs):  # what the update really ran on
        micro = build(*args, **kwargs)
        shapes.append([(tuple(mb.input_ids.shape), mb.packed) for mb in micro])
        return micro

    trainer_module.build_micro_batches = recording
    try:
        losses, layout = [], []
        for _ in range(steps):
            metrics = trainer.train_step()
            trainer.step += 1
            losses.append(metrics["loss"])
            layout.append((metrics["batch/micro_batches"], metrics["batch/real_token_frac"]))
    finally:
        trainer_module.build_micro_batches = build
    trainer.logger.close()
    params = {name: p.detach().clone() for name, p in trainer.chunks[0].named_parameters()}
    return {"losses": losses, "params": params, "shapes": shapes, "layout": layout}


def thd_rope_world(hf_dir):
    """What the Transformer Engine path relies on, run on CPU: megatron's RoPE for THD (the function
    its attention calls with ``packed_seq_params``), given the packed stream's per-token mrope angles
    and our ``cu_seqlens``, rotates every row exactly as the padded layout does (bshd)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    from visurf_megatron.training.packing import build_micro_batches

    from .qwen_world import build_model

    model, extras, ps = build_model(hf_dir, 1, 1, False)
    config = model.language_model.config
    prompts = make_prompts(hf_dir)
    rows = make_rows(prompts, extras)
    kw = dict(image_token_id=extras.image_token_id, pad_id=0, spatial_merge_size=extras.spatial_merge_size)
    indices = [0, 3, 4, 7, 8]  # 0, 1 and 2 images
    packed = build_micro_batches(rows, indices, prompts, max_tokens=2000, micro_batch_size=1, **kw)
    padded = build_micro_batches(rows, indices, prompts, micro_batch_size=len(indices), **kw)
    assert len(packed) == 1 and len(padded) == 1
    pk, pd = packed[0], padded[0]
    rope = MultimodalRotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                     rotary_base=extras.rope_theta)
    heads, dim = 2, config.kv_channels
    gen = torch.Generator().manual_seed(0)
    q_rows = torch.randn(pd.input_ids.shape[1], len(indices), heads, dim, generator=gen)  # [S, B, h, d]
    q_stream = torch.zeros(pk.input_ids.shape[1], heads, dim)  # [T, h, d]
    for r in range(len(indices)):
        n = int(pk.cu_seqlens[r + 1] - pk.cu_seqlens[r])  # row r is segment r
        q_stream[pk.pack_index[r, :n]] = q_rows[:n, r]
    freqs_stream = rope(pk.position_ids, config.mrope_section)  # [T, 1, 1, d]
    freqs_rows = rope(pd.position_ids, config.mrope_section)  # [S, B, 1, d]
    thd = apply_rotary_pos_emb(q_stream, freqs_stream, config, cu_seqlens=pk.cu_seqlens,
                               cp_group=ps.get_context_parallel_group())
    bshd = apply_rotary_pos_emb(q_rows, freqs_rows, config)
    worst, wrong_restart = 0.0, 0.0
    # The classic packing bug: angles restarting at stream offset 0 for every row (1-D positions).
    naive = apply_rotary_pos_emb(q_stream, freqs_stream[: int(pk.max_seqlen)], config, cu_seqlens=pk.cu_seqlens,
                                 cp_group=ps.get_context_parallel_group())
    for r in range(len(indices)):
        n = int(pk.cu_seqlens[r + 1] - pk.cu_seqlens[r])
        at = pk.pack_index[r, :n]
        worst = max(worst, float((thd[at] - bshd[:n, r]).abs().max()))
        wrong_restart = max(wrong_restart, float((naive[at] - bshd[:n, r]).abs().max()))
    return {"worst": worst, "naive": wrong_restart, "total": int(pk.cu_seqlens[-1]), "T": pk.input_ids.shape[1]}


def gt_style_scores(base: dict, overrides: list[str], budget: int) -> dict:
    """``gt_style: auto``'s teacher-forced scores of this rank's first prompts, padded and packed."""
    from visurf_megatron.training.batching import sequence_multiple
    from visurf_megatron.training.gt_style_choice import candidate_styles, score_gt_styles
    from visurf_megatron.training.trainer import Trainer

    from .trainer_world import _config

    trainer = Trainer(_config(base, overrides))
    par = trainer.cfg.parallel
    prompts = [trainer.preparer(s) for s in trainer.feed.next_batch()]
    kw = dict(tokenizer=trainer.tokenizer, end_of_turn_id=trainer.end_of_turn_id,
              image_token_id=trainer.extras.image_token_id, pad_id=trainer.pad_id,
              spatial_merge_size=trainer.extras.spatial_merge_size, micro_batch_size=2,
              seq_multiple=sequence_multiple(par.tp, par.sequence_parallel, False))
    out = {m: score_gt_styles(trainer.chunks, prompts, candidate_styles(), max_tokens=m, **kw) for m in (0, budget)}
    trainer.logger.close()
    return out
