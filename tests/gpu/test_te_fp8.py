"""GPU tier: the tiny Qwen2.5-VL on the Transformer Engine backend (BF16) and with FP8 in the language model.

Runs in a real 1-rank world (nccl) at TP1. Skipped on machines without CUDA or without an importable
Transformer Engine: those conditions are checked without importing TE at collection time.
"""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Transformer Engine backend, FP8)"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs transformer-engine (the `gpu` extra)"),
]


def te_world(hf_dir, batch, scenarios):
    """For each (name, backend, fp8): BF16 model on the GPU, eval logits, then one forward+backward."""
    from visurf_megatron.checkpoint.hf_import import load_hf_state_dict_into
    from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
    from visurf_megatron.models.qwen2_5_vl.config import ParallelLayout, configs_from_hf
    from visurf_megatron.models.qwen2_5_vl.model import Qwen25VLModel
    from visurf_megatron.models.qwen2_5_vl.rope import mrope_position_ids
    from visurf_megatron.models.qwen2_5_vl.specs import fp8_overrides, select_backend
    from visurf_megatron.runtime import setup_model_parallel

    assert select_backend("auto") == "te"
    setup_model_parallel(tp=1, pp=1, seed=11)
    device = torch.device("cuda", torch.cuda.current_device())
    results = {}
    for name, backend, fp8 in scenarios:
        lang, vis, extras = configs_from_hf(hf_dir, ParallelLayout(), params_dtype=torch.bfloat16,
                                            **fp8_overrides(fp8, "tensorwise", 1))
        model = Qwen25VLModel(lang, vis, extras, backend=backend).to(device)
        with open_hf_checkpoint(hf_dir) as tensors:
            load_hf_state_dict_into([model], tensors)
        pos, _ = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], image_token_id=extras.image_token_id,
                                    spatial_merge_size=extras.spatial_merge_size, attention_mask=batch["attention_mask"])
        b = {k: v.to(device) for k, v in batch.items()}
        args = (b["input_ids"], pos.to(device), b["pixel_values"], b["image_grid_thw"])
        model.eval()
        with torch.no_grad():
            logits = model(*args)[..., : extras.vocab_size].float().cpu()
        model.train()
        model.zero_grad(set_to_none=True)
        mask = b["attention_mask"].float()
        logp = model(*args, labels=torch.roll(b["input_ids"], -1, dims=1))
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        grads = {"finite": True, "with_grad": 0, "total": 0}
        for p in model.parameters():
            grads["total"] += 1
            if p.grad is not None:
                grads["with_grad"] += 1
                grads["finite"] &= bool(torch.isfinite(p.grad).all())
        # TE modules record whether their last forward ran in FP8.
        fp8_layers = [bool(getattr(layer.self_attention.linear_qkv, "fp8", False))
                      for layer in model.language_model.decoder.layers]
        vision_fp8 = any(bool(getattr(m, "fp8", False)) for m in model.vision_model.modules())
        results[name] = {"logits": logits, "loss": float(loss), "grads": grads, "fp8_layers": fp8_layers,
                         "vision_fp8": vision_fp8}
        del model
        torch.cuda.empty_cache()
    return results


def _min_cosine(a, b, real):
    return torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1).min().item()


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    from tests.qwen_fixtures import build_batch, build_checkpoint, hf_reference_logits
    from visurf_megatron.runtime.spawn import run_world

    hf_dir = build_checkpoint(tmp_path_factory.mktemp("te"), "untied")
    # 16-aligned sequence (and batch 2): FP8 GEMMs need token counts divisible by 16.
    batch = build_batch(hf_dir, pad_to_multiple=16)
    reference = hf_reference_logits(hf_dir, batch)
    scenarios = [("local", "local", None), ("te", "te", None), ("te_fp8", "te", "hybrid")]
    (results,) = run_world(te_world, 1, hf_dir, batch, scenarios, timeout_s=600)
    return results, reference, batch["attention_mask"].bool()


def test_te_backend_matches_local_and_transformers_in_bf16(gpu_results):
    results, reference, real = gpu_results
    te, local = results["te"]["logits"], results["local"]["logits"]
    assert te.shape == reference.shape
    assert _min_cosine(te, local, real) >= 0.99
    assert _min_cosine(te, reference, real) >= 0.99
    assert _min_cosine(local, reference, real) >= 0.99
    for name in ("te", "local"):
        g = results[name]["grads"]
        assert g["finite"] and g["with_grad"] == g["total"], (name, g)
    assert results["te"]["fp8_layers"] == [False] * 4


def test_fp8_hybrid_language_only_forward_backward(gpu_results):
    results, reference, real = gpu_results
    r = results["te_fp8"]
    assert torch.isfinite(r["logits"][real]).all()
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert r["grads"]["finite"] and r["grads"]["with_grad"] == r["grads"]["total"], r["grads"]
    # 4 language layers: the first and last stay BF16, the middle two run FP8; the vision tower never does.
    assert r["fp8_layers"] == [False, True, True, False]
    assert r["vision_fp8"] is False


@pytest.fixture(scope="module")
def qwen2_vl_gpu_results(tmp_path_factory):
    """The other family (issue 22) on Transformer Engine: its vision LayerNorm is fused into TE's linears
    (``layer_norm_weight`` and ``layer_norm_bias``, mapped by the family's table)."""
    from tests.qwen_fixtures import build_batch, build_checkpoint, hf_reference_logits
    from visurf_megatron.runtime.spawn import run_world

    hf_dir = build_checkpoint(tmp_path_factory.mktemp("te_qwen2_vl"), "untied", family="qwen2_vl")
    batch = build_batch(hf_dir, pad_to_multiple=16)
    reference = hf_reference_logits(hf_dir, batch)
    (results,) = run_world(te_world, 1, hf_dir, batch, [("local", "local", None), ("te", "te", None)], timeout_s=600)
    return results, reference, batch["attention_mask"].bool()


def test_qwen2_vl_te_backend_matches_local_and_transformers_in_bf16(qwen2_vl_gpu_results):
    results, reference, real = qwen2_vl_gpu_results
    te, local = results["te"]["logits"], results["local"]["logits"]
    assert te.shape == reference.shape
    assert _min_cosine(te, local, real) >= 0.99
    assert _min_cosine(te, reference, real) >= 0.99
    for name in ("te", "local"):
        g = results[name]["grads"]
        assert g["finite"] and g["with_grad"] == g["total"], (name, g)
