"""Losses: aggregation modes, PPO clip / dual clip, KL and entropy terms, on hand-made tensors."""
import math

import pytest
import torch

from visurf_megatron.algorithm.losses import (
    AGG_MODES,
    aggregate,
    aggregation_normaliser,
    entropy_bonus,
    k3_kl,
    policy_loss,
    policy_shaping_token_loss,
    sft_loss,
)

D = torch.float64

# rows: [1,2 | 3,4 masked], [5,6,7 | 8 masked], [all masked]
L = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=D)
M = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=D)


# ---------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, expect",
    [
        ("token-mean", (1 + 2 + 5 + 6 + 7) / 5),  # 21 / 5 tokens
        ("seq-mean-token-mean", ((1 + 2) / 2 + (5 + 6 + 7) / 3) / 2),  # (1.5 + 6) / 2 seqs
        ("seq-mean-token-sum", (3 + 18) / 2),
        ("seq-mean-token-sum-norm", 21 / 4),  # / T = 4
    ],
)
def test_aggregate_modes(mode, expect):
    assert aggregate(L, M, mode).item() == pytest.approx(expect)
    # the fully masked row counts neither as tokens nor as a sequence: dropping it changes nothing
    assert aggregate(L[:2], M[:2], mode).item() == pytest.approx(expect)


def test_aggregate_normaliser_and_override():
    assert aggregation_normaliser(M, "token-mean").item() == 5
    assert aggregation_normaliser(M, "seq-mean-token-mean").item() == 2
    assert aggregation_normaliser(M, "seq-mean-token-sum").item() == 2
    assert aggregation_normaliser(M, "seq-mean-token-sum-norm").item() == 4
    assert aggregate(L, M, "token-mean", norm=10).item() == pytest.approx(2.1)
    assert aggregate(L, M, "seq-mean-token-mean", norm=3).item() == pytest.approx(7.5 / 3)


def test_aggregate_global_norm_over_micro_batches():
    # splitting rows into micro-batches and using the global normaliser reproduces the full value
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        full = aggregate(L, M, mode)
        norm = sum(aggregation_normaliser(M[i : i + 1], mode) for i in range(3))
        parts = sum(aggregate(L[i : i + 1], M[i : i + 1], mode, norm=norm) for i in range(3))
        assert parts.item() == pytest.approx(full.item())


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(L, M, "tokenmean")
    modes = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"}
    assert set(AGG_MODES) >= modes


@pytest.mark.parametrize("mode", sorted(AGG_MODES))
def test_aggregate_all_zero_mask_no_nan(mode):
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3, dtype=D), mode)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_aggregate_ignores_inf_on_padding():
    x = torch.tensor([[1.0, float("-inf")]], dtype=D)
    assert aggregate(x, torch.tensor([[1.0, 0.0]], dtype=D)).item() == 1.0


# ---------------------------------------------------------------------------------------------
# PPO clip
# ---------------------------------------------------------------------------------------------
def _one_token_each(ratios, advs):
    old = torch.zeros(len(ratios), 1, dtype=D)
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=D, requires_grad=True)
    return logp, old, torch.tensor(advs, dtype=D), torch.ones(len(ratios), 1, dtype=D)


def test_clip_positive_and_negative_advantages():
    # clip 0.2:
    #  A=+1 r=1.5 -> -min(1.5, 1.2) = -1.2  clipped, no grad
    #  A=+1 r=0.5 -> -min(0.5, 0.8) = -0.5  not clipped, dl/dlogp = -r A = -0.5
    #  A=-1 r=1.5 -> -min(-1.5, -1.2) = 1.5 not clipped, dl/dlogp = -r A = 1.5
    #  A=-1 r=0.5 -> -min(-0.5, -0.8) = 0.8 clipped, no grad
    logp, old, adv, mask = _one_token_each([1.5, 0.5, 1.5, 0.5], [1.0, 1.0, -1.0, -1.0])
    loss, met = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    loss.backward()
    assert logp.grad.squeeze(-1).tolist() == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0])
    assert met["clip_frac"].item() == pytest.approx(0.5)
    assert met["ratio_mean"].item() == pytest.approx(1.0)
    # approx_kl = mean(old - logp) = -(log1.5 + log.5 + log1.5 + log.5) / 4
    assert met["approx_kl"].item() == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 4)
    assert "dual_clip_frac" not in met


def test_clip_higher_asymmetric():
    # clip_high .28: r=1.25 with A=+1 stays unclipped (-1.25); r=.75 with A=-1 is clipped at .8
    logp, old, adv, mask = _one_token_each([1.25, 0.75], [1.0, -1.0])
    loss, met = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert met["clip_frac"].item() == pytest.approx(0.5)


def test_ratio_one_is_plain_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([2.0, -1.0], dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
    loss, met = policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # token-mean over 3 tokens: dL/dlogp = -A/3 on unmasked tokens
    assert torch.allclose(logp.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]], dtype=D))
    assert loss.item() == pytest.approx((-2 - 2 + 1) / 3)
    assert met["clip_frac"].item() == 0.0
    assert met["approx_kl"].item() == 0.0


def test_dual_clip():
    # c = 3:
    #  A=-1 r=5 -> standard 5, capped to 3, grad 0 (dual clipped)
    #  A=-1 r=2 -> 2 (< 3), grad -rA = 2
    #  A=+1 r=5 -> -1.2 (upper clip), dual clip never applies to A > 0
    logp, old, adv, mask = _one_token_each([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    loss, met = policy_loss(logp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    loss.backward()
    assert logp.grad.squeeze(-1).tolist() == pytest.approx([0.0, 2 / 3, 0.0])
    assert met["dual_clip_frac"].item() == pytest.approx(1 / 3)
    # without dual clip the first token keeps its full loss 5
    logp2, old2, adv2, mask2 = _one_token_each([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    loss2, _ = policy_loss(logp2, old2, adv2, mask2, agg="seq-mean-token-sum")
    assert loss2.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)
    with pytest.raises(ValueError):
        policy_loss(logp2, old2, adv2, mask2, dual_clip=1.0)


def test_ratio_clamped_in_log_space():
    logp = torch.tensor([[100.0]], dtype=D)
    adv = torch.tensor([-1.0], dtype=D)
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(logp))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.exp(20.0))


def test_token_level_advantages_accepted():
    logp = torch.zeros(2, 3, dtype=D)
    adv_tok = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=D)
    loss, _ = policy_loss(logp, logp, adv_tok, torch.ones_like(logp))
    assert loss.item() == pytest.approx(-6 / 6)


# ---------------------------------------------------------------------------------------------
# KL (off by default) and k3
# ---------------------------------------------------------------------------------------------
def test_no_kl_by_default():
    logp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-3.0, -0.1]], dtype=D)
    adv, mask = torch.tensor([1.0], dtype=D), torch.ones(1, 2, dtype=D)
    a, ma = policy_loss(logp, logp.detach(), adv, mask)
    (ga,) = torch.autograd.grad(a, logp)
    b, mb = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref)
    (gb,) = torch.autograd.grad(b, logp)
    c, _ = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, kl_coef=0.0)
    assert a.item() == b.item() == c.item()
    assert torch.equal(ga, gb)
    assert "kl" not in mb


def test_k3_kl_term():
    logp = torch.tensor([[-1.0, -2.0]], dtype=D)
    ref = torch.tensor([[-3.0, -0.1]], dtype=D)
    # d = ref - logp = [-2, 1.9]; k3 = e^d - d - 1
    k = [math.exp(-2) + 2 - 1, math.exp(1.9) - 1.9 - 1]
    assert k3_kl(logp, ref).squeeze(0).tolist() == pytest.approx(k)
    adv, mask = torch.tensor([1.0], dtype=D), torch.ones(1, 2, dtype=D)
    loss, met = policy_loss(logp, logp, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * sum(k) / 2)
    assert met["kl"].item() == pytest.approx(sum(k) / 2)
    assert k3_kl(ref, ref).abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# SFT, entropy, shaping
# ---------------------------------------------------------------------------------------------
def test_sft_loss():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=D)
    assert sft_loss(logp, mask).item() == pytest.approx(7 / 3)
    assert sft_loss(logp, mask, agg="seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)


def test_entropy_bonus_sign():
    ent = torch.full((2, 2), 2.0, dtype=D)
    mask = torch.ones(2, 2, dtype=D)
    assert entropy_bonus(ent, mask).item() == 0.0  # off by default
    # the term is ADDED to the loss: -coef * mean entropy
    assert entropy_bonus(ent, mask, coef=0.01).item() == pytest.approx(-0.02)
    ent.requires_grad_(True)
    entropy_bonus(ent, mask, coef=0.01).backward()
    assert (ent.grad < 0).all()  # descending the loss increases entropy


def test_policy_shaping_token_loss():
    # p = .5, gamma = .1: f = .5/.6; dl/dlogp = -A gamma p / (p+gamma)^2 = -2 * .05/.36
    logp = torch.tensor([[math.log(0.5)]], dtype=D, requires_grad=True)
    out = policy_shaping_token_loss(logp, torch.tensor([2.0], dtype=D), gamma=0.1)
    assert out.item() == pytest.approx(-2 * 0.5 / 0.6)
    out.sum().backward()
    assert logp.grad.item() == pytest.approx(-2 * 0.1 * 0.5 / 0.36)
