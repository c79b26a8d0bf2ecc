"""Rank functions for the megatron-core-on-CPU tests (module-level so ``spawn`` can import them)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VOCAB, SEQ, MICRO_BATCH, HEAD_DIM = 128, 16, 2, 16


def build_gpt(tp: int, pp: int, sequence_parallel: bool, seed: int = 7):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from visurf_megatron.models.local_spec import block_spec_for_stage, local_layer_spec
    from visurf_megatron.runtime import setup_model_parallel

    setup_model_parallel(tp=tp, pp=pp, sequence_parallel=sequence_parallel, seed=seed)
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        batch_p2p_sync=False,
        mrope_section=[2, 3, 3],
    )
    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec_for_stage(local_layer_spec(), config),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre,
        post_process=post,
        position_embedding_type="mrope",
        rotary_base=10000,
    )
    return model, config


def make_batches(n_micro: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_micro):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        # 3-row mrope ids: text-like (all rows equal) for the first half, image-like for the rest.
        pos = torch.arange(SEQ).expand(3, MICRO_BATCH, SEQ).clone()
        pos[1, :, SEQ // 2 :] = pos[1, :, SEQ // 2 :] // 2
        pos[2, :, SEQ // 2 :] = pos[2, :, SEQ // 2 :] % 4
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": pos})
    return batches


def forward_backward(model, config, n_micro: int) -> float | None:
    """One real pipeline-schedule forward+backward; returns the mean loss on the last stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = iter(make_batches(n_micro))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    model.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[model],
        num_microbatches=n_micro,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    if parallel_state.is_pipeline_last_stage():
        return float(torch.stack([m["loss"] for m in losses]).mean())
    return None


def grad_report(model) -> dict:
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = sorted(n for n, g in grads.items() if g is None)
    finite = all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    nonzero = sorted(n for n, g in grads.items() if g is not None and g.abs().sum() > 0)
    return {"n_params": len(grads), "missing": missing, "finite": finite, "nonzero": len(nonzero)}


def run_layouts(layouts):
    """Run each (tp, pp, sp, n_micro) layout in this world; return per-layout loss and grad report."""
    from visurf_megatron.runtime import cpu

    out = []
    for tp, pp, sp, n_micro in layouts:
        model, config = build_gpt(tp, pp, sp)
        loss = forward_backward(model, config, n_micro)
        report = grad_report(model)
        report.update(layout=(tp, pp, sp, n_micro), loss=loss, shim_active=cpu.is_active())
        assert loss is None or math.isfinite(loss)
        out.append(report)
    return out


def groups_over_rebuilds(rebuilds: int) -> list[tuple[int, int]]:
    """(live process groups, native threads of this process) after each of ``rebuilds`` calls of
    ``setup_model_parallel``, the way a process that builds trainer after trainer makes them."""
    import os

    from torch.distributed import distributed_c10d

    from visurf_megatron.runtime import setup_model_parallel

    out = []
    for i in range(rebuilds):
        setup_model_parallel(tp=2 if i % 2 else 1, pp=1)
        out.append((len(distributed_c10d._world.pg_map), len(os.listdir("/proc/self/task"))))
    return out
