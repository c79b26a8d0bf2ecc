"""Advantage estimators: hand-checked values (derivations in the comments)."""
import math

import pytest
import torch

from visurf_megatron.algorithm.advantages import (
    ADVANTAGE_ESTIMATORS,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage_estimator,
    visurf_advantages,
    visurf_advantages_with_stats,
)

EPS = 1e-6


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def flags(x):
    return torch.tensor(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# ViSurf: the headline example
# ---------------------------------------------------------------------------------------------
def test_all_wrong_rollouts_gt_right_ddof1():
    # R = [0]*8 + [1]: mean = 1/9; sum sq dev = 8/81 + 64/81 = 72/81; /8 -> var 1/9, std 1/3.
    r = t([0.0] * 8 + [1.0])
    adv = visurf_advantages(r, ids([0] * 9), flags([False] * 8 + [True]), eps=EPS, std_ddof=1)
    assert adv[:8].tolist() == pytest.approx([(-1 / 9) / (1 / 3 + EPS)] * 8, abs=1e-12)
    assert adv[8].item() == pytest.approx((8 / 9) / (1 / 3 + EPS), abs=1e-12)
    assert adv[:8].tolist() == pytest.approx([-1 / 3] * 8, abs=1e-5)
    assert adv[8].item() == pytest.approx(8 / 3, abs=1e-5)


def test_all_wrong_rollouts_gt_right_not_smoothed_even_with_smoothing():
    # max rollout reward 0 < r_gt = 1, so smoothing must leave r_gt alone.
    r = t([0.0] * 8 + [1.0])
    gi, gt = ids([0] * 9), flags([False] * 8 + [True])
    on = visurf_advantages(r, gi, gt, smooth=True)
    off = visurf_advantages(r, gi, gt, smooth=False)
    assert torch.equal(on, off)


def test_ddof0():
    # ddof=0: var = (72/81)/9 = 8/81, std = sqrt(8)/9 -> A_gt = (8/9)/(sqrt8/9) = sqrt(8).
    r = t([0.0] * 8 + [1.0])
    adv = visurf_advantages(r, ids([0] * 9), flags([False] * 8 + [True]), std_ddof=0, eps=0.0)
    assert adv[8].item() == pytest.approx(math.sqrt(8), rel=1e-12)
    assert adv[:8].tolist() == pytest.approx([-1 / math.sqrt(8)] * 8, rel=1e-12)


def test_no_std_drgrpo():
    r = t([0.0] * 8 + [1.0])
    adv = visurf_advantages(r, ids([0] * 9), flags([False] * 8 + [True]), norm_by_std=False)
    assert adv[8].item() == pytest.approx(8 / 9, abs=1e-12)
    assert adv[:8].tolist() == pytest.approx([-1 / 9] * 8, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# smoothing
# ---------------------------------------------------------------------------------------------
def test_smoothing_sets_gt_to_rollout_mean():
    # rollouts [1, 0, 0.5, 1], r_gt = 1: max 1 >= 1 -> r_gt := 2.5/4 = 0.625.
    # R = [1, 0, .5, 1, .625], mean .625, devs [.375, -.625, -.125, .375, 0],
    # sum sq = .140625 + .390625 + .015625 + .140625 = .6875, var = .6875/4 = .171875.
    r = t([1.0, 0.0, 0.5, 1.0, 1.0])
    gt = flags([False, False, False, False, True])
    adv, stats = visurf_advantages_with_stats(r, ids([3] * 5), gt, eps=EPS)
    std = math.sqrt(0.171875)
    expect = [d / (std + EPS) for d in (0.375, -0.625, -0.125, 0.375)]
    assert adv[:4].tolist() == pytest.approx(expect, abs=1e-12)
    assert adv[4].item() == 0.0  # exactly
    # rollouts == plain GRPO over the rollouts plus one extra member at their mean
    aug = grpo_advantages(t([1.0, 0.0, 0.5, 1.0, 0.625]), ids([0] * 5), eps=EPS)
    assert torch.allclose(adv[:4], aug[:4], atol=1e-12)
    assert stats.smoothed.all()
    assert stats.frac_smoothed.item() == 1.0
    assert stats.mean_adv_gt.item() == 0.0
    assert stats.rewards[4].item() == pytest.approx(0.625)


def test_smoothing_off_keeps_gt_reward():
    # R = [1, 0, .5, 1, 1]: mean .7, devs [.3, -.7, -.2, .3, .3], sum sq .8, var .2.
    r = t([1.0, 0.0, 0.5, 1.0, 1.0])
    gt = flags([False, False, False, False, True])
    adv = visurf_advantages(r, ids([0] * 5), gt, smooth=False, eps=EPS)
    std = math.sqrt(0.2)
    assert adv.tolist() == pytest.approx([d / (std + EPS) for d in (0.3, -0.7, -0.2, 0.3, 0.3)], abs=1e-12)


def test_smoothing_tie_counts():
    # max == r_gt triggers smoothing (>=): rollouts [0, 2], gt 2 -> r_gt := 1, A_gt = 0.
    adv = visurf_advantages(t([0.0, 2.0, 2.0]), ids([0, 0, 0]), flags([False, False, True]))
    assert adv[2].item() == 0.0
    # R = [0, 2, 1]: mean 1, std 1
    assert adv[:2].tolist() == pytest.approx([-1 / (1 + EPS), 1 / (1 + EPS)], abs=1e-12)


def test_smoothing_via_compare_rewards():
    # totals: rollouts [2, 1], gt 3 -> on totals max 2 < 3, no smoothing: R=[2,1,3], mean 2, std 1.
    # accuracy: rollouts [1, 0], gt 1 -> max 1 >= 1, smoothing: r_gt := mean(2, 1) = 1.5,
    # R = [2, 1, 1.5], mean 1.5, std(ddof1) = sqrt((.25+.25)/2) = .5.
    r = t([2.0, 1.0, 3.0])
    acc = t([1.0, 0.0, 1.0])
    gi, gt = ids([0, 0, 0]), flags([False, False, True])
    plain = visurf_advantages(r, gi, gt, eps=EPS)
    assert plain.tolist() == pytest.approx([0.0, -1 / (1 + EPS), 1 / (1 + EPS)], abs=1e-12)
    by_acc, stats = visurf_advantages_with_stats(r, gi, gt, compare_rewards=acc, eps=EPS)
    assert by_acc.tolist() == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0], abs=1e-12)
    assert by_acc[2].item() == 0.0
    assert stats.smoothed.all()


# ---------------------------------------------------------------------------------------------
# batch structure
# ---------------------------------------------------------------------------------------------
def _mixed_batch():
    """Five groups with non-contiguous ids, different sizes; expected values by hand.

    g=10: rollouts [0,0,0], gt 1 (no smoothing): R=[0,0,0,1], mean .25, var = (3*.0625+.5625)/3 = .25,
          std .5 -> rollouts -.25/.5 = -.5, gt .75/.5 = 1.5
    g=-4: rollouts [1, 3] no gt: mean 2, std sqrt(2) -> [-1/sqrt2, 1/sqrt2]
    g=7 : all-equal zeros, with gt 0: smoothing (0 >= 0) -> r_gt := 0, everything 0
    g=99: a lone rollout -> 0
    g=5 : rollouts [2, 0, 1, 1, 2, 0], gt 2: max 2 >= 2 -> r_gt := 1, mean 1,
          devs [1,-1,0,0,1,-1,0], sum sq 4, var 4/6 -> std sqrt(2/3); gt 0
    """
    rows = [
        (10, 0.0, False, -0.25 / (0.5 + EPS)),
        (10, 0.0, False, -0.25 / (0.5 + EPS)),
        (10, 1.0, True, 0.75 / (0.5 + EPS)),
        (10, 0.0, False, -0.25 / (0.5 + EPS)),
        (-4, 1.0, False, -1 / (math.sqrt(2) + EPS)),
        (-4, 3.0, False, 1 / (math.sqrt(2) + EPS)),
        (7, 0.0, False, 0.0),
        (7, 0.0, True, 0.0),
        (7, 0.0, False, 0.0),
        (99, 5.0, False, 0.0),
    ]
    s = math.sqrt(2 / 3) + EPS
    for r, a in zip([2.0, 0.0, 1.0, 1.0, 2.0, 0.0], [1, -1, 0, 0, 1, -1]):
        rows.append((5, r, False, a / s))
    rows.append((5, 2.0, True, 0.0))
    g, r, gt, a = zip(*rows)
    return ids(list(g)), t(list(r)), flags(list(gt)), t(list(a))


def test_mixed_batch_values():
    g, r, gt, expect = _mixed_batch()
    adv, stats = visurf_advantages_with_stats(r, g, gt, eps=EPS)
    assert adv.tolist() == pytest.approx(expect.tolist(), abs=1e-10)
    # groups with a GT row: 10 (not smoothed), 7 (smoothed), 5 (smoothed)
    assert stats.num_gt_groups == 3
    assert stats.frac_smoothed.item() == pytest.approx(2 / 3)
    assert stats.mean_adv_gt.item() == pytest.approx((0.75 / (0.5 + EPS)) / 3, rel=1e-6)
    smoothed_groups = set(stats.group_ids[stats.group_smoothed].tolist())
    assert smoothed_groups == {7, 5}
    assert stats.smoothed.tolist() == [gi in (7, 5) for gi in g.tolist()]


def test_shuffled_rows_follow():
    g, r, gt, _ = _mixed_batch()
    base = visurf_advantages(r, g, gt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(r.shape[0], generator=gen)
        shuf = visurf_advantages(r[perm], g[perm], gt[perm])
        assert torch.allclose(shuf, base[perm], atol=1e-12)


def test_group_without_gt_is_plain_grpo():
    g, r, gt, _ = _mixed_batch()
    adv = visurf_advantages(r, g, gt)
    sel = g == -4
    assert torch.allclose(adv[sel], grpo_advantages(r[sel], g[sel]), atol=1e-12)


def test_group_of_one_is_zero():
    for ddof in (0, 1):
        assert grpo_advantages(t([3.0]), ids([0]), std_ddof=ddof).tolist() == [0.0]
        assert visurf_advantages(t([3.0]), ids([0]), flags([True]), std_ddof=ddof).tolist() == [0.0]
        assert grpo_advantages(t([3.0]), ids([0]), std_ddof=ddof, norm_by_std=False).tolist() == [0.0]
        assert grpo_advantages(t([3.0]), ids([0]), std_ddof=ddof, eps=0.0).tolist() == [0.0]  # not NaN


def test_all_equal_group_zero():
    adv = grpo_advantages(t([0.0] * 4), ids([1] * 4))
    assert adv.tolist() == [0.0] * 4
    adv = visurf_advantages(t([0.0] * 5), ids([1] * 5), flags([False] * 4 + [True]), smooth=False)
    assert adv.tolist() == [0.0] * 5
    assert not torch.isnan(adv).any()


def test_two_gt_rows_raise():
    with pytest.raises(ValueError, match="at most one GT"):
        visurf_advantages(t([0.0, 1.0, 1.0]), ids([0, 0, 0]), flags([False, True, True]))
    with pytest.raises(ValueError, match="at most one GT"):
        visurf_advantages(t([0.0, 1.0, 1.0]), ids([0, 0, 0]), flags([False, True, True]), smooth=False)


def test_gt_alone_in_group():
    adv, stats = visurf_advantages_with_stats(t([1.0, 0.0, 1.0]), ids([0, 1, 1]), flags([True, False, False]))
    assert adv[0].item() == 0.0
    assert not stats.smoothed[0]


def test_grpo_hand_values_and_dtype():
    # [1, 2, 3, 6]: mean 3, devs [-2,-1,0,3], sum sq 14, var(ddof1) 14/3
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), ids([0] * 4), eps=0.0)
    s = math.sqrt(14 / 3)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([-2 / s, -1 / s, 0.0, 3 / s], rel=1e-6)
    # integer rewards come back float32
    adv_i = grpo_advantages(torch.tensor([1, 2, 3, 6]), ids([0] * 4), eps=0.0)
    assert adv_i.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_registry_names_and_unknown():
    for name in ("grpo", "drgrpo", "visurf"):
        assert name in ADVANTAGE_ESTIMATORS
    with pytest.raises(KeyError, match="grpo"):
        get_advantage_estimator("nope")


def test_registry_uniform_signature():
    r = t([0.0] * 8 + [1.0])
    g = ids([0] * 9)
    gt = flags([False] * 8 + [True])
    v = get_advantage_estimator("visurf")(r, g, gt)
    assert v[8].item() == pytest.approx(8 / 3, abs=1e-5)
    # grpo/drgrpo exclude GT rows from the statistics: rollouts all 0 -> all 0
    assert get_advantage_estimator("grpo")(r, g, gt).tolist() == [0.0] * 9
    assert get_advantage_estimator("drgrpo")(r, g, gt).tolist() == [0.0] * 9
    # rollouts [0, 1] + GT 5 (ignored): drgrpo -> [-.5, .5, 0]
    dr = get_advantage_estimator("drgrpo")(t([0.0, 1.0, 5.0]), ids([0] * 3), flags([False, False, True]))
    assert dr.tolist() == pytest.approx([-0.5, 0.5, 0.0])
    # without is_gt all three estimators agree on a GT-free batch
    r2, g2 = t([1.0, 3.0, 0.0, 0.0, 2.0]), ids([0, 0, 1, 1, 1])
    assert torch.allclose(get_advantage_estimator("grpo")(r2, g2), grpo_advantages(r2, g2))
    assert torch.allclose(get_advantage_estimator("visurf")(r2, g2), grpo_advantages(r2, g2))


def test_register_custom_estimator():
    @register_advantage_estimator("_test_zero")
    def _zero(rewards, group_index, is_gt=None, **kw):
        return torch.zeros_like(rewards)

    try:
        assert get_advantage_estimator("_test_zero")(t([1.0]), ids([0])).tolist() == [0.0]
    finally:
        ADVANTAGE_ESTIMATORS.pop("_test_zero")


def test_smoothed_gt_advantage_is_exactly_zero_despite_rounding():
    # a float32 group where (sum(r) + mean(r)) / (G+1) - mean(r) rounds to ~-3e-16 in float64:
    # A_gt must still be exactly 0 (no spurious SFT term on an answer the policy already matches)
    r = torch.tensor([2.400034189224243, 0.4830883741378784, 0.8468057513237, 2.044825553894043,
                      2.745581865310669, 1.1912996768951416, 0.4830883741378784])
    gt = flags([False] * 6 + [True])
    adv = visurf_advantages(r, ids([0] * 7), gt)
    assert adv[6].item() == 0.0
