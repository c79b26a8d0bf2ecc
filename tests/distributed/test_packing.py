"""Packed micro-batches equal padded ones (issue 18): per-token log-probs, loss and every gradient.

fp32, the real megatron-core model in gloo worlds, a ViSurf update over prompts with 0, 1 and 2
images whose G+1 rows spread over several packed micro-batches, with one vision pass per update
(the default) and with one per micro-batch.
"""
import pytest
import torch

from tools.make_tiny_checkpoint import make_tiny_checkpoint
from visurf_megatron.runtime.spawn import run_world

from .packing_world import packed_vs_padded, relative_error

LOGP_ATOL = 1e-5
REL = 1e-6
BUDGET = 160  # tokens per packed stream: rows of ~60-100 tokens, so 1-2 rows per micro-batch


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("packing") / "hf", seed=0)


def check(result, *, budget=BUDGET):
    report = {"logp": 0.0, "loss": 0.0, "grad": 0.0}
    for variant in ("packed", "packed_own_vision"):
        for k, v in check_variant(result, variant, budget).items():
            report[k] = max(report[k], v)
    # One vision pass per schedule run (forward-only, then training) over every image prompt's
    # images once, against one pass per micro-batch holding images without it; none off the first stage.
    shared, own = result["packed"]["vision_passes"], result["packed_own_vision"]["vision_passes"]
    if not result["first_stage"]:
        assert shared == own == []
    else:
        assert shared == [result["images"]] * 2, shared  # each distinct prompt's images, once per run
        assert sum(own) >= sum(shared), own
    return report


def check_variant(result, variant, budget):
    padded, packed = result["padded"], result[variant]
    plan, lengths, prompt_of = result["plan"], result["lengths"], result["prompt_of"]
    # Every row in exactly one packed micro-batch, each stream within the budget, one shape for all.
    placed = sorted(r for mb in plan for r in mb if r >= 0)
    assert placed == sorted(lengths), plan
    stream = result["stream"]
    loads = [sum(lengths[r] for r in mb if r >= 0) for mb in plan]
    assert max(loads) <= budget  # every row here is shorter than the budget
    # One shape: the fullest stream's, rounded up to what sequence parallel needs.
    assert stream[0] == 1 and stream[1] == -(-max(loads) // result["multiple"]) * result["multiple"]
    report = {"logp": 0.0, "loss": 0.0, "grad": 0.0}
    if result["last_stage"]:
        assert set(packed["logp"]) == set(padded["logp"]) == set(lengths)
        for r, ref in padded["logp"].items():
            n = lengths[r] - 1  # every position whose label is the row's own next token
            diff = float((packed["logp"][r][:n] - ref[:n]).abs().max())
            report["logp"] = max(report["logp"], diff)
            assert diff <= LOGP_ATOL, (result["layout"], variant, r, diff)
            assert torch.isfinite(ref[:n]).all()
        report["loss"] = abs(packed["loss"] - padded["loss"]) / abs(padded["loss"])
        assert report["loss"] <= REL, (result["layout"], variant, packed["loss"], padded["loss"])
    assert set(packed["grads"]) == set(padded["grads"]) and padded["grads"]
    for name, ref in padded["grads"].items():
        if ref.norm() == 0:
            assert packed["grads"][name].norm() == 0, name
            continue
        rel = relative_error(packed["grads"][name], ref)
        report["grad"] = max(report["grad"], rel)
        assert rel <= REL, (result["layout"], variant, name, rel)
    return report


def test_packed_equals_padded_tp1_tp2sp_pp2(hf_dir):
    layouts = [(1, 1, False), (2, 1, True), (1, 2, False)]
    # Under tp1/pp1 the two ranks are DP replicas with different rows: rank 1 has fewer, so the
    # micro-batch count agreed by all-reduce MAX gives it filler micro-batches.
    results = run_world(packed_vs_padded, 2, hf_dir, layouts, BUDGET, [list(range(9)), [0, 4, 8]], timeout_s=900)
    worst = {}
    for rank_results in results:
        for result in rank_results:
            report = check(result)
            for k, v in report.items():
                worst[k] = max(worst.get(k, 0.0), v)
    dp = [r[0] for r in results]  # layout (1, 1): DP2
    assert len(dp[0]["plan"]) == len(dp[1]["plan"])
    assert [-1] in dp[1]["plan"], dp[1]["plan"]  # a filler micro-batch on the rank with fewer rows
    full = results[0][1]  # TP2+SP, all 9 rows
    by_prompt = {}
    for k, mb in enumerate(full["plan"]):
        for r in mb:
            by_prompt.setdefault(full["prompt_of"][r], set()).add(k)
    assert any(len(ks) > 1 for ks in by_prompt.values()), full["plan"]  # a group split over micro-batches
    assert any(len({full["prompt_of"][r] for r in mb}) < len(mb) for mb in full["plan"]), full["plan"]  # shared
    # Without the shared pass a prompt split over micro-batches is encoded in each of them.
    assert sum(full["packed_own_vision"]["vision_passes"]) > sum(full["packed"]["vision_passes"])
    print(f"packed vs padded, worst: {worst}")


def test_three_trainer_steps_packed_equal_padded(hf_dir, tmp_path):
    """The whole trainer, DP2 (the packed micro-batch count agreed across ranks), two mini-batches per
    step (old log-probs from a packed pass): the same losses and parameters after three steps."""
    from tools.make_synthetic_grounding import generate

    from .packing_world import trainer_steps

    generate(tmp_path / "data", train=16, val=0, size=56, seed=0, no_object_fraction=0.25, progress=False)
    base = {
        "model": {"hf_path": str(hf_dir), "dtype": "fp32", "spec": "local"},
        "parallel": {"tp": 1, "pp": 1},
        "rollout": {"engine": "hf", "n": 3, "max_new_tokens": 16},
        "data": {"train_path": str(tmp_path / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": 2},
        "train": {"steps": 3, "lr": 1.0e-3, "micro_batch_size": 2, "mini_batches_per_step": 2},
        "algorithm": {"paradigm": "visurf"},
        "logging": {"dir": str(tmp_path / "logs"), "tensorboard": False},
    }
    padded = run_world(trainer_steps, 2, base, [f"logging.dir={tmp_path / 'padded'}"], 3, timeout_s=900)
    packed = run_world(trainer_steps, 2, base, [f"logging.dir={tmp_path / 'packed'}",
                                                 "train.max_tokens_per_micro_batch=400"], 3, timeout_s=900)
    for rank in range(2):
        a, b = padded[rank], packed[rank]
        assert all(not p for shapes in a["shapes"] for _, p in shapes)
        assert all(p and s == shapes[0][0] for shapes in b["shapes"] for s, p in shapes)
        assert len(b["shapes"]) == 3 * 3  # per step: old log-probs + two mini-batches
        assert all(s[1] <= 400 for shapes in b["shapes"] for s, _ in shapes)
        assert any(len(shapes) > 1 for shapes in b["shapes"])  # several packed micro-batches
        for x, y in zip(a["losses"], b["losses"]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a["losses"], b["losses"])
        worst = max(float((b["params"][n] - p).abs().max()) for n, p in a["params"].items())
        assert worst <= 1e-5, worst
    # The DP ranks ran as many packed micro-batches as each other in every update.
    assert [len(s) for s in packed[0]["shapes"]] == [len(s) for s in packed[1]["shapes"]]
    # The logged layout: micro-batches per optimizer step (the two mini-batches' builds, after the
    # old log-probs' one) and the share of stream positions holding a row token, higher packed.
    for run in (padded[0], packed[0]):
        for step, (count, _) in enumerate(run["layout"]):
            builds = run["shapes"][3 * step + 1: 3 * step + 3]
            assert count == sum(len(b) for b in builds) / 2, (run["layout"], run["shapes"])
    fills = [(a[1], b[1]) for a, b in zip(padded[0]["layout"], packed[0]["layout"])]
    assert all(0 < a <= b <= 1 for a, b in fills) and any(a < b for a, b in fills), fills  # equal rows: equal
    print(f"trainer: losses padded {padded[0]['losses']} packed {packed[0]['losses']}, shapes {packed[0]['shapes']}")


def test_thd_rope_takes_each_rows_own_mrope_angles(hf_dir):
    """The Transformer Engine path (THD ``cu_seqlens``) rotates with megatron's THD RoPE: given the
    stream's per-token mrope angles it must rotate each row as its padded row is (exactly), where
    angles restarting from the stream's start for every row (the classic bug) would not."""
    from .packing_world import thd_rope_world

    result = run_world(thd_rope_world, 1, hf_dir, timeout_s=300)[0]
    assert result["total"] == result["T"]  # the tail of padding is a segment: exact-offset mapping
    assert result["worst"] <= 1e-6, result
    assert result["naive"] > 1e-2, result
    print(f"THD rope vs padded: {result}")


def test_packed_equals_padded_tp2xpp2_sp(hf_dir):
    results = run_world(packed_vs_padded, 4, hf_dir, [(2, 2, True)], BUDGET, timeout_s=900)
    worst = {}
    for rank_results in results:
        for k, v in check(rank_results[0]).items():
            worst[k] = max(worst.get(k, 0.0), v)
    assert sum(r[0]["last_stage"] for r in results) == 2
    print(f"packed vs padded TP2xPP2+SP, worst: {worst}")


def test_gt_style_scores_packed_equal_padded(hf_dir, tmp_path):
    """``algorithm.gt_style: auto`` scores its candidates with the update's micro-batches: packed
    streams (TP2+SP) give the padded scores."""
    from tools.make_synthetic_grounding import generate

    from .packing_world import gt_style_scores

    generate(tmp_path / "data", train=8, val=0, size=56, seed=2, no_object_fraction=0.25, progress=False)
    base = {
        "model": {"hf_path": str(hf_dir), "dtype": "fp32", "spec": "local"},
        "parallel": {"tp": 2, "pp": 1, "sequence_parallel": True},
        "algorithm": {"paradigm": "visurf"},
        "rollout": {"engine": "hf", "n": 2, "max_new_tokens": 8},
        "data": {"train_path": str(tmp_path / "data" / "train.jsonl"), "image_size": 56, "prompts_per_step": 3},
        "train": {"steps": 1, "lr": 1.0e-3, "micro_batch_size": 2},
        "logging": {"dir": str(tmp_path / "logs"), "tensorboard": False},
    }
    scores = run_world(gt_style_scores, 2, base, [], 600, timeout_s=600)[0]
    padded, packed = scores[0], scores[600]
    assert set(padded) == set(packed) and len(padded) > 1
    for style, ref in padded.items():
        assert abs(packed[style] - ref) <= 1e-5 * abs(ref), (style, packed[style], ref)
