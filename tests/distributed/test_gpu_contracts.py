"""GPU-path contracts that need several ranks (issue 17), in gloo worlds with real megatron-core."""
import math

import pytest
import torch

from tests.qwen_fixtures import build_batch, build_checkpoint, hf_reference_logits
from tools.make_synthetic_grounding import generate
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from visurf_megatron.runtime.spawn import run_world

from .gpu_contracts_world import entropy_at_temperature, fp8_padding_step


def test_entropy_at_temperature_below_one_on_a_padded_vocabulary(tmp_path):  # defect 7
    hf_dir = build_checkpoint(tmp_path, "untied")  # 500 tokens, 512 rows: rank 1 of TP2 holds the padding
    batch = build_batch(hf_dir)
    t = 0.7
    results = run_world(entropy_at_temperature, 2, hf_dir, batch, t, timeout_s=300)
    assert [r["rank_holds_padding"] for r in results] == [False, True]
    ref = hf_reference_logits(hf_dir, batch).double() / t
    ref_logp_all = torch.log_softmax(ref, -1)
    ref_entropy = -(ref_logp_all.exp() * ref_logp_all).sum(-1)
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    ref_logp = ref_logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    real = batch["attention_mask"].bool()
    for r in results:
        assert r["local_logits_finite"], "padded columns must hold a finite mask value after the temperature"
        assert torch.isfinite(r["entropy"]).all()
        assert (r["entropy"].double() - ref_entropy)[real].abs().max() <= 1e-4
        assert (r["logp"].double() - ref_logp)[real].abs().max() <= 1e-4
        assert (r["fused_logp"].double() - ref_logp)[real].abs().max() <= 1e-4
        assert (r["full"].double() - ref)[real].abs().max() <= 1e-4


@pytest.fixture(scope="module")
def trainer_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_pad")
    hf = make_tiny_checkpoint(root / "hf", seed=0)
    generate(root / "data", train=8, val=2, size=56, seed=0, no_object_fraction=0.25, progress=False)
    return root, {
        "model": {"hf_path": str(hf), "dtype": "bf16", "spec": "local"},
        "parallel": {"tp": 2, "pp": 1, "sequence_parallel": True},
        "rollout": {"engine": "hf", "n": 2, "max_new_tokens": 7},
        "data": {"train_path": str(root / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": 2},
        "train": {"steps": 1, "lr": 1.0e-4, "micro_batch_size": 2, "mini_batches_per_step": 2},
        "algorithm": {"gt_style": "auto"},
        "logging": {"dir": str(root / "logs"), "tensorboard": False},
    }


def test_fp8_sequence_parallel_pads_every_micro_batch_for_transformer_engine(trainer_base):  # defects 3, 8
    def te_fp8_shape_ok(rows, cols):  # TE 2.11 assert_dim_for_fp8_exec, written out independently
        return rows % 8 == 0 and cols % 16 == 0

    root, base = trainer_base
    results = run_world(fp8_padding_step, 2, base, ["model.fp8=hybrid", "model.fp8_bf16_first_last_layers=0"],
                        timeout_s=600)
    tags = {tag for tag, _ in results[0]["shapes"]}
    assert tags == {"update", "gt_style"}  # the update, its old log-probs and the GT-style scoring
    for r in results:
        assert math.isfinite(r["loss"])
        # defect 8: entropy_coef = 0: the entropy is still computed (and logged), without autograd.
        assert r["updates"] and all(u == {"with_entropy": True, "entropy_grad": False} for u in r["updates"])
        assert math.isfinite(r["entropy"])
        for tag, shapes in r["shapes"]:
            for b, s in shapes:
                # TE's rule on the local [S/tp * B, H] input of every linear (H = 64 here).
                assert s % 2 == 0 and te_fp8_shape_ok(s // 2 * b, 64), (tag, b, s)
                assert s % 16 == 0, (tag, s)  # for any micro-batch size, not just this one
