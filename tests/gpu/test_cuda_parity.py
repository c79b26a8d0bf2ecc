"""GPU tier: the megatron Qwen2.5-VL (local spec, TP1) on CUDA against transformers on CUDA, in fp32
and bf16, through the trainer's own path: micro-batches collated on the CPU, megatron's schedule
(``run_micro_batches`` moves them to the GPU), vocab-parallel log-probs and entropy at T = 0.7 on a
vocabulary megatron pads (500 -> 512 rows). Skipped without CUDA; ``tools/gpu_smoke.sh`` runs it.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU path of the model)")

TEMPERATURE = 0.7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_parity_world(hf_dir, batch, dtype_names):
    """Per dtype: eval logits [B, S, V] and, through ``run_micro_batches``, log-probs and entropy at T."""
    from visurf_megatron.checkpoint.hf_import import load_hf_state_dict_into
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids
    from visurf_megatron.runtime.distributed import setup_model_parallel
    from visurf_megatron.training.batching import MicroBatch
    from visurf_megatron.training.forward import run_micro_batches

    torch.backends.cudnn.allow_tf32 = False  # the patch Conv3d, as the reference computes it
    torch.backends.cuda.matmul.allow_tf32 = False
    setup_model_parallel(tp=1, pp=1, seed=11)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    results = {}
    for name in dtype_names:
        lang, vis, extras = configs_from_hf(hf_dir, ParallelLayout(), params_dtype=DTYPES[name])
        model = Qwen25VLModel(lang, vis, extras, backend="local").to(device)
        with open_hf_checkpoint(hf_dir) as tensors:
            load_hf_state_dict_into([model], tensors)
        model.eval()
        pos, _ = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=extras.image_token_id,
                                    spatial_merge_size=extras.spatial_merge_size, attention_mask=batch["attention_mask"])
        with torch.no_grad():
            logits = model(batch["input_ids"].to(device), pos.to(device), batch["pixel_values"].to(device),
                           batch["image_grid_thw"].to(device))[..., : extras.vocab_size].float().cpu()
        # The trainer's path: a CPU micro-batch; the schedule moves it where the model is.
        labels = torch.roll(batch["input_ids"], -1, dims=1)
        mb = MicroBatch(batch["input_ids"], labels, batch["attention_mask"].float(), pos, batch["pixel_values"],
                        batch["image_grid_thw"], torch.arange(batch["input_ids"].shape[0]))
        seen = []

        def loss_fn(moved, logp, entropy):
            seen.append(sorted({t.device.type for t in (moved.input_ids, moved.labels, moved.loss_mask,
                                                         moved.position_ids, moved.pixel_values, logp)}))
            return logp.sum() * 0, {"logp": logp.detach().cpu(), "entropy": entropy.detach().cpu()}

        with torch.no_grad():
            (out,) = run_micro_batches([model], [mb], loss_fn, forward_only=True, temperature=TEMPERATURE,
                                       with_entropy=True, entropy_grad=False)
        results[name] = {"logits": logits, "logp": out["logp"], "entropy": out["entropy"], "devices": seen}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _reference(hf_dir, batch, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").cuda()
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.cuda() for k, v in batch.items()}).logits.float().cpu()
    del model
    torch.cuda.empty_cache()
    return logits


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from tests.qwen_fixtures import build_batch, build_checkpoint
    from visurf_megatron.runtime.spawn import run_world

    hf_dir = build_checkpoint(tmp_path_factory.mktemp("cuda_parity"), "untied")
    batch = build_batch(hf_dir)
    (ours,) = run_world(cuda_parity_world, 1, hf_dir, batch, list(DTYPES), timeout_s=600)
    references = {name: _reference(hf_dir, batch, dtype) for name, dtype in DTYPES.items()}
    return ours, references, batch


def _logp_entropy(logits, labels):
    logp_all = torch.log_softmax(logits.double() / TEMPERATURE, -1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("name, logit_tol, logp_tol, min_cosine", [("fp32", 2e-3, 2e-3, 0.99999),
                                                                   ("bf16", None, 0.15, 0.995)])
def test_megatron_on_cuda_matches_transformers(parity, name, logit_tol, logp_tol, min_cosine):
    ours, references, batch = parity
    r, ref = ours[name], references[name]
    real = batch["attention_mask"].bool()
    assert r["devices"] == [["cuda"]], r["devices"]  # every micro-batch field reached the GPU
    cosine = torch.nn.functional.cosine_similarity(r["logits"][real], ref[real], dim=-1).min().item()
    assert cosine >= min_cosine, (name, cosine)
    if logit_tol is not None:
        assert (r["logits"] - ref)[real].abs().max().item() <= logit_tol
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    ref_logp, ref_entropy = _logp_entropy(references["fp32"], labels)
    assert torch.isfinite(r["entropy"]).all() and torch.isfinite(r["logp"]).all()
    assert (r["logp"].double() - ref_logp)[real].abs().max().item() <= logp_tol
    assert (r["entropy"].double() - ref_entropy)[real].abs().max().item() <= logp_tol
