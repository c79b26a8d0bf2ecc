"""Megatron Qwen2.5-VL == transformers Qwen2.5-VL (and Qwen2-VL == Qwen2-VL), under every parallel layout,
and the mapping round trip."""
import pytest
import torch

from tests.qwen_fixtures import build_batch, build_checkpoint, hf_reference_logits
from visurf_megatron.runtime.spawn import run_world

from .qwen_world import equal_images_vision_world, parity_world


def _references(root, family):
    dirs = {kind: build_checkpoint(root, kind, family=family) for kind in ("untied", "tied")}
    batches = {kind: build_batch(d) for kind, d in dirs.items()}
    logits = {kind: hf_reference_logits(dirs[kind], batches[kind]) for kind in dirs}
    return dirs, batches, logits


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return _references(tmp_path_factory.mktemp("qwen"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen2_vl_references(tmp_path_factory):
    """The same checks on the other family: Qwen2-VL (LayerNorm vision blocks, fc1/fc2 MLP, no windows)."""
    return _references(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl")


def _check(results, references, expected_layouts):
    dirs, batches, ref_logits = references
    seen = set()
    for rank_results in results:
        for r in rank_results:
            kind, layout = r["kind"], r["layout"]
            seen.add((kind, layout))
            assert r["roundtrip_mismatch"] == [], f"{kind} {layout}: round trip differs for {r['roundtrip_mismatch'][:5]}"
            assert r["roundtrip_extra"] == [], f"{kind} {layout}: unexpected HF names {r['roundtrip_extra'][:5]}"
            for tower, g in r["grads"].items():
                assert g["finite"], f"{kind} {layout} {tower}: non-finite gradients"
                assert g["nonzero"] == g["total"], f"{kind} {layout} {tower}: {g['total'] - g['nonzero']} zero grads"
            if r["has_vision"]:
                assert "vision" in r["grads"]
            if r["logp"] is not None:
                # Vocab-parallel log-probs of given labels == log_softmax of the HF logits.
                labels = torch.roll(batches[kind]["input_ids"], -1, dims=1)
                ref_logp = torch.log_softmax(ref_logits[kind], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                real = batches[kind]["attention_mask"].bool()
                assert (r["logp"][real] - ref_logp[real]).abs().max().item() <= 1e-4
            if r["logits"] is None:
                continue
            real = batches[kind]["attention_mask"].bool()
            ours, ref = r["logits"][real], ref_logits[kind][real]
            assert ours.shape == ref.shape
            max_abs = (ours - ref).abs().max().item()
            cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
            print(f"{r.get('family')} {kind} {layout}: max |logit diff| {max_abs:.3g}, min cosine {cosine:.7f}")
            assert max_abs <= 1e-4, f"{kind} {layout}: max |logit diff| {max_abs}"
            assert cosine >= 0.9999, f"{kind} {layout}: min cosine {cosine}"
    assert seen == {(k, l) for k in references[0] for l in expected_layouts}


def test_tp1_tp2_sp_pp2_match_transformers(references):
    dirs, batches, _ = references
    layouts = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]
    results = run_world(parity_world, 2, dirs, batches, layouts, timeout_s=600)
    _check(results, references, layouts)
    # Every layout produced logits on at least one rank (PP2: only the last stage).
    assert all(any(r["logits"] is not None for rr in results for r in rr if r["layout"] == l) for l in layouts)


def test_tp2_x_pp2_sequence_parallel_matches_transformers(references):
    dirs, batches, _ = references
    layouts = [(2, 2, True)]
    results = run_world(parity_world, 4, dirs, batches, layouts, timeout_s=600)
    _check(results, references, layouts)


def test_qwen2_vl_tp1_tp2_sp_pp2_match_transformers(qwen2_vl_references):
    dirs, batches, _ = qwen2_vl_references
    layouts = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]
    results = run_world(parity_world, 2, dirs, batches, layouts, timeout_s=600)
    _check(results, qwen2_vl_references, layouts)
    assert all(any(r["logits"] is not None for rr in results for r in rr if r["layout"] == l) for l in layouts)
    assert all(r["family"] == "qwen2_vl" for rr in results for r in rr)


def test_qwen2_vl_tp2_x_pp2_sequence_parallel_matches_transformers(qwen2_vl_references):
    dirs, batches, _ = qwen2_vl_references
    layouts = [(2, 2, True)]
    results = run_world(parity_world, 4, dirs, batches, layouts, timeout_s=600)
    _check(results, qwen2_vl_references, layouts)


def test_vision_regions_of_one_length_run_batched_and_match_transformers(tmp_path):
    """Images of one size: every window (56 px) and image region has one length, so the local backend
    runs them as a batch [L, R, h]. Output == transformers' vision tower; output and gradients ==
    the block-diagonal-mask path."""
    import numpy as np

    from tests.qwen_fixtures import _image
    from tools.make_tiny_checkpoint import load_processor
    from visurf_megatron.models.families import transformers_class

    hf_dir = build_checkpoint(tmp_path, "untied")
    rng = np.random.default_rng(5)
    images = [_image(rng, 112, 112) for _ in range(3)]
    batch = dict(load_processor(hf_dir).image_processor(images=images, return_tensors="pt"))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    hf = transformers_class("qwen2_5_vl", "model").from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    out = run_world(equal_images_vision_world, 1, hf_dir, batch, timeout_s=300)[0]
    batched, masked = out[True], out[False]
    assert batched["merged"].shape == ref.shape == (3 * 16, ref.shape[-1])
    assert (batched["merged"] - ref).abs().max().item() <= 1e-5
    assert (batched["merged"] - masked["merged"]).abs().max().item() <= 1e-6
    assert len(batched["grads"]) == batched["n_params"] == len(masked["grads"])
    for name, g in masked["grads"].items():
        assert torch.allclose(batched["grads"][name], g, rtol=1e-5, atol=1e-7), name
