"""Paradigms: each one's defining behaviour, and the ViSurf gradient identity (paper Eq. 9-10)."""
import math

import pytest
import torch
from torch import nn

from visurf_megatron.algorithm.advantages import grpo_advantages, visurf_advantages
from visurf_megatron.algorithm.losses import aggregate, policy_loss, sft_loss
from visurf_megatron.algorithm.paradigms import (
    PARADIGMS,
    paradigm_from_config,
    RowBatch,
    filter_groups,
    get_paradigm,
    mu_at,
)

D = torch.float64


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def flags(x):
    return torch.tensor(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# a tiny "policy": Embedding + Linear, teacher-forced per-token log-probs
# ---------------------------------------------------------------------------------------------
class TinyPolicy(nn.Module):
    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        """tokens [B, T+1] -> logp [B, T] of tokens[:, 1:] given the previous token."""
        logits = self.out(torch.tanh(self.emb(tokens[:, :-1])))
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyPolicy().to(D)
    # two prompts: group 0 = 3 rollouts + GT (row 3), group 1 = 2 rollouts + GT (row 6)
    tokens = torch.randint(0, 11, (7, 7))
    lengths = torch.tensor([6, 3, 5, 4, 2, 6, 3])
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    rows = RowBatch(
        rewards=torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 3.0, 2.0], dtype=D),
        group_index=ids([0, 0, 0, 0, 1, 1, 1]),
        is_gt=flags([False, False, False, True, False, False, True]),
    )
    return model, tokens, mask, rows


def _params(model):
    return [p for p in model.parameters()]


def _grad(scalar, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, _params(model), retain_graph=True)])


def _row_logp_grads(model, tokens, mask):
    """grad of sum_t logp_{j,t} for every row j (masked tokens only)."""
    logp = model(tokens)
    return [_grad((logp[j] * mask[j]).sum(), model) for j in range(tokens.shape[0])]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_visurf_gradient_is_advantage_weighted_sum_of_score_functions(agg):
    model, tokens, mask, rows = _setup()
    p = get_paradigm("visurf", agg=agg)
    info = p.compute_row_info(rows)
    adv = info.advantages.to(D)
    # group 0 not smoothed (max 1 < 2), group 1 smoothed (3 >= 2) -> A_gt(1) = 0
    assert adv[3] > 0 and adv[6].item() == 0.0

    logp = model(tokens)
    loss, metrics = p.loss(logp, logp.detach(), mask, info)
    g = _grad(loss, model)

    score = _row_logp_grads(model, tokens, mask)
    n_tok = mask.sum(-1)
    if agg == "token-mean":
        # grad L = -(1/sum mask) sum_j A_j sum_t grad logp_{j,t}
        expect = -sum(adv[j] * score[j] for j in range(7)) / mask.sum()
    else:
        # grad L = -(1/B) sum_j A_j (1/|o_j|) sum_t grad logp_{j,t}
        expect = -sum(adv[j] * score[j] / n_tok[j] for j in range(7)) / 7
    assert torch.allclose(g, expect, atol=1e-12)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)

    # Eq. 9-10: the same gradient = A_gt-weighted SFT on the GT rows + RLVR on the rollouts.
    gt, roll = rows.is_gt, ~rows.is_gt
    gt_m, roll_m = mask * gt.to(D).unsqueeze(-1), mask * roll.to(D).unsqueeze(-1)
    if agg == "token-mean":
        w_gt, w_roll = gt_m.sum() / mask.sum(), roll_m.sum() / mask.sum()
    else:
        w_gt, w_roll = gt.sum() / 7, roll.sum() / 7
    # the SFT term per GT row, each weighted by its own A_gt (sft_loss is an unweighted NLL)
    sft_part = torch.zeros_like(g)
    for j in torch.nonzero(gt).flatten().tolist():
        row_m = torch.zeros_like(mask)
        row_m[j] = mask[j]
        w_row = mask[j].sum() / mask.sum() if agg == "token-mean" else torch.tensor(1 / 7, dtype=D)
        sft_part += adv[j] * w_row * _grad(sft_loss(logp, row_m, agg=agg), model)
    rl_loss, _ = policy_loss(logp, logp.detach(), adv, roll_m, agg=agg)
    rl_part = w_roll * _grad(rl_loss, model)
    assert torch.allclose(g, sft_part + rl_part, atol=1e-12)
    # the smoothed group's GT contributes nothing: only row 3's SFT term is non-zero
    assert w_gt > 0
    assert sft_part.abs().max() > 0


def test_visurf_equals_grpo_over_g_plus_1_with_smoothing():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("visurf")
    info = p.compute_row_info(rows)
    # by hand: group 0 keeps r_gt = 2; group 1 smooths r_gt := mean(1, 3) = 2 (3 >= 2)
    smoothed = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 3.0, 2.0], dtype=D)
    assert torch.allclose(info.advantages.to(D), grpo_advantages(smoothed, rows.group_index), atol=1e-6)
    assert info.metrics["visurf/frac_groups_smoothed"].item() == pytest.approx(0.5)
    assert info.pg_rows.all() and not info.sft_rows.any()
    logp = model(tokens)
    a, _ = p.loss(logp, logp.detach(), mask, info)
    b, _ = policy_loss(logp, logp.detach(), info.advantages, mask)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # without smoothing group 1's GT (reward 2 vs mean 2 of [1,3]) is 0 anyway; group 0 unchanged
    ns = get_paradigm("visurf", smooth=False).compute_row_info(rows)
    assert torch.allclose(ns.advantages.to(D), grpo_advantages(rows.rewards, rows.group_index), atol=1e-6)


def test_visurf_row_batch_accepted_and_micro_batches_with_global_norms():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("visurf")
    logp = model(tokens)
    full, _ = p.loss(logp, logp.detach(), mask, rows)  # RowBatch -> computed on the spot
    info = p.compute_row_info(rows)
    micro = [torch.tensor([0, 4, 1]), torch.tensor([2, 3, 5, 6])]
    norm = sum(p.normalisers(mask[i], info.select(i))["loss"] for i in micro)
    old = logp.detach()
    parts = sum(
        p.loss(logp[i], old[i], mask[i], info.select(i), norms={"loss": norm})[0] for i in micro
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# registry and common knobs
# ---------------------------------------------------------------------------------------------
def test_registry():
    assert set(PARADIGMS) >= {"sft", "rlvr", "sft_then_rlvr", "visurf", "luffy", "chord", "hpt"}
    with pytest.raises(KeyError, match="visurf"):
        get_paradigm("ppo")
    with pytest.raises(TypeError):
        get_paradigm("visurf", smoth=False)
    with pytest.raises(ValueError):
        get_paradigm("rlvr", agg="mean")
    p = get_paradigm("visurf")
    assert (p.clip_low, p.clip_high, p.dual_clip, p.agg, p.eps, p.std_ddof, p.smooth, p.kl_coef) == (
        0.2, 0.2, None, "token-mean", 1e-6, 1, True, 0.0,
    )


@pytest.mark.parametrize("name", ["visurf", "rlvr", "luffy", "chord", "hpt"])
def test_no_kl_by_default_in_paradigms(name):
    model, tokens, mask, rows = _setup()
    p = get_paradigm(name)
    logp = model(tokens)
    ref = logp.detach() - 0.3
    a, _ = p.loss(logp, logp.detach(), mask, rows)
    b, mb = p.loss(logp, logp.detach(), mask, rows, ref_logp=ref)
    assert a.item() == b.item()
    assert torch.equal(_grad(a, model), _grad(b, model))
    assert "kl" not in mb
    c, mc = get_paradigm(name, kl_coef=0.5).loss(logp, logp.detach(), mask, rows, ref_logp=ref)
    assert c.item() > a.item() and mc["kl"].item() > 0


def test_entropy_bonus_in_paradigm():
    model, tokens, mask, rows = _setup()
    logp = model(tokens)
    ent = torch.full_like(logp, 2.0)
    a, ma = get_paradigm("visurf").loss(logp, logp.detach(), mask, rows, entropy=ent)
    b, _ = get_paradigm("visurf", entropy_coef=0.01).loss(logp, logp.detach(), mask, rows, entropy=ent)
    assert b.item() == pytest.approx(a.item() - 0.02)
    assert ma["entropy"].item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# SFT, RLVR, SFT -> RLVR
# ---------------------------------------------------------------------------------------------
def test_sft_uses_only_gt_rows():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("sft")
    assert p.uses_gt_rows(0) and not p.needs_rollouts(0)
    logp = model(tokens).detach().requires_grad_(True)
    loss, _ = p.loss(logp, None, mask, rows)  # no old log-probs needed
    gt_m = mask * rows.is_gt.to(D).unsqueeze(-1)
    # NLL over rows 3 and 6: (sum of their -logp) / (4 + 3 tokens)
    assert loss.item() == pytest.approx((-(logp * gt_m).sum() / 7).item())
    loss.backward()
    assert torch.equal(logp.grad[~rows.is_gt], torch.zeros_like(logp.grad[~rows.is_gt]))
    assert (logp.grad[rows.is_gt] * gt_m[rows.is_gt] <= 0).all()


def test_rlvr_ignores_gt_rows():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("rlvr")
    assert not p.uses_gt_rows(0) and p.needs_rollouts(0)
    info = p.compute_row_info(rows)
    roll = ~rows.is_gt
    # advantages from rollouts only: group 0 [0,1,0] and group 1 [1,3]
    expect = grpo_advantages(rows.rewards[roll], rows.group_index[roll])
    assert torch.allclose(info.advantages[roll].to(D), expect, atol=1e-6)
    assert not info.pg_rows[rows.is_gt].any()
    logp = model(tokens).detach().requires_grad_(True)
    with_gt, _ = p.loss(logp, logp.detach(), mask, info)
    only_roll = RowBatch(rows.rewards[roll], rows.group_index[roll], rows.is_gt[roll])
    without, _ = p.loss(logp[roll], logp.detach()[roll], mask[roll], only_roll)
    assert with_gt.item() == pytest.approx(without.item(), abs=1e-12)
    with_gt.backward()
    assert torch.equal(logp.grad[rows.is_gt], torch.zeros_like(logp.grad[rows.is_gt]))


def test_drgrpo_knob():
    _, _, _, rows = _setup()
    info = get_paradigm("rlvr", norm_by_std=False).compute_row_info(rows)
    # group 0 rollouts [0,1,0]: mean 1/3 -> [-1/3, 2/3, -1/3]; group 1 [1,3]: [-1, 1]
    assert info.advantages[[0, 1, 2, 4, 5]].tolist() == pytest.approx([-1 / 3, 2 / 3, -1 / 3, -1, 1])


def test_sft_then_rlvr_switches_at_step():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("sft_then_rlvr", switch_step=3)
    assert [p.uses_gt_rows(s) for s in range(5)] == [True, True, True, False, False]
    assert [p.needs_rollouts(s) for s in range(5)] == [False, False, False, True, True]
    logp = model(tokens)
    sft_val, _ = get_paradigm("sft").loss(logp, None, mask, rows)
    rl_val, _ = get_paradigm("rlvr").loss(logp, logp.detach(), mask, rows)
    assert p.loss(logp, logp.detach(), mask, p.compute_row_info(rows, 2), 2)[0].item() == sft_val.item()
    assert p.loss(logp, logp.detach(), mask, p.compute_row_info(rows, 3), 3)[0].item() == rl_val.item()
    assert sft_val.item() != rl_val.item()


# ---------------------------------------------------------------------------------------------
# LUFFY
# ---------------------------------------------------------------------------------------------
def test_luffy_shaping_changes_only_external_rows():
    model, tokens, mask, rows = _setup()
    luffy = get_paradigm("luffy", gamma=0.1)
    info = luffy.compute_row_info(rows)
    # mixed-group advantages, no smoothing
    mixed = visurf_advantages(rows.rewards, rows.group_index, rows.is_gt, smooth=False)
    assert torch.allclose(info.advantages.to(D), mixed.to(D), atol=1e-6)
    assert info.shaped_rows.tolist() == rows.is_gt.tolist()

    base = model(tokens).detach()
    old = base.clone()
    old[rows.is_gt] -= 5.0  # a wild old log-prob on the GT rows must not matter: no ratio, no clip
    logp_l = base.clone().requires_grad_(True)
    logp_v = base.clone().requires_grad_(True)
    ll, _ = luffy.loss(logp_l, old, mask, info)
    lv, _ = get_paradigm("visurf", smooth=False).loss(logp_v, base, mask, info)
    ll.backward()
    lv.backward()
    roll, gt = ~rows.is_gt, rows.is_gt
    assert torch.allclose(logp_l.grad[roll], logp_v.grad[roll], atol=1e-12)
    # GT rows: token-mean grad of -A p/(p+g) wrt logp is -A g p/(p+g)^2 / N
    p = base.exp()
    A = info.advantages.to(D).unsqueeze(-1)
    expect = -A * 0.1 * p / (p + 0.1) ** 2 / mask.sum() * mask
    assert torch.allclose(logp_l.grad[gt], expect[gt], atol=1e-12)
    assert not torch.allclose(logp_l.grad[gt], logp_v.grad[gt])


# ---------------------------------------------------------------------------------------------
# CHORD
# ---------------------------------------------------------------------------------------------
def test_chord_mu_schedules():
    # cosine .9 -> .05 over 200: mid point (.9 + .05) / 2
    assert mu_at(0, "cosine", 0.9, 0.05, 200) == pytest.approx(0.9)
    assert mu_at(100, "cosine", 0.9, 0.05, 200) == pytest.approx(0.475)
    assert mu_at(50, "cosine", 0.9, 0.05, 200) == pytest.approx(0.05 + 0.85 * 0.5 * (1 + math.sqrt(0.5)))
    assert mu_at(200, "cosine", 0.9, 0.05, 200) == pytest.approx(0.05)
    assert mu_at(999, "cosine", 0.9, 0.05, 200) == pytest.approx(0.05)
    # linear warm-up 0 -> 1 over 10 steps, then held
    assert [mu_at(s, "linear", 0.0, 1.0, 10) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert mu_at(7, "constant", 0.3, 0.0, 10) == 0.3
    # warm-up phase before the schedule (Trinity-RFT's CHORD): 0 -> start
    assert mu_at(5, "cosine", 0.9, 0.05, 200, warmup_steps=10) == pytest.approx(0.45)
    assert mu_at(10, "cosine", 0.9, 0.05, 200, warmup_steps=10) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        mu_at(0, "step", 1, 0, 1)
    p = get_paradigm("chord", mu_schedule="linear", mu_start=0.2, mu_end=0.6, mu_steps=4)
    assert [p.mu(s) for s in range(6)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6])


def test_chord_loss_mixes_grpo_and_sft():
    model, tokens, mask, rows = _setup()
    p = get_paradigm("chord", mu_schedule="constant", mu_start=0.25)
    info = p.compute_row_info(rows)
    logp = model(tokens)
    loss, met = p.loss(logp, logp.detach(), mask, info)
    roll_m = mask * (~rows.is_gt).to(D).unsqueeze(-1)
    gt_m = mask * rows.is_gt.to(D).unsqueeze(-1)
    adv = info.advantages.to(D)
    roll = ~rows.is_gt
    assert torch.allclose(adv[roll], grpo_advantages(rows.rewards[roll], rows.group_index[roll]), atol=1e-6)
    rl, _ = policy_loss(logp, logp.detach(), adv, roll_m)
    expect = 0.75 * rl + 0.25 * sft_loss(logp, gt_m)
    assert loss.item() == pytest.approx(expect.item(), abs=1e-12)
    assert torch.allclose(_grad(loss, model), _grad(expect, model), atol=1e-12)
    assert met["mu"].item() == 0.25


def test_chord_phi_weights():
    _, _, mask, rows = _setup()
    logp = torch.full((7, 6), math.log(0.5), dtype=D)
    p = get_paradigm("chord", mu_schedule="constant", mu_start=1.0, phi=True)
    loss, _ = p.loss(logp, logp, mask, rows)
    # phi = p(1-p) = .25 on every GT token: .25 * log 2
    assert loss.item() == pytest.approx(0.25 * math.log(2))


# ---------------------------------------------------------------------------------------------
# HPT
# ---------------------------------------------------------------------------------------------
def test_hpt_switches_per_prompt():
    model, tokens, mask, _ = _setup()
    # group 0: no rollout correct (acc [0, 0, 0]) -> SFT on its GT (row 3), rollouts dropped
    # group 1: rollout 5 correct -> RL on rollouts 4, 5, GT row 6 dropped
    rows = RowBatch(
        rewards=torch.tensor([0.1, 0.3, 0.2, 2.0, 0.5, 3.0, 2.0], dtype=D),
        group_index=ids([0, 0, 0, 0, 1, 1, 1]),
        is_gt=flags([False, False, False, True, False, False, True]),
        compare_rewards=torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=D),
    )
    p = get_paradigm("hpt")
    info = p.compute_row_info(rows)
    assert info.sft_rows.tolist() == [False, False, False, True, False, False, False]
    assert info.pg_rows.tolist() == [False, False, False, False, True, True, False]
    assert info.metrics["hpt/frac_groups_sft"].item() == pytest.approx(0.5)
    # group 1 RL advantages: rollouts [.5, 3] -> [-1, 1] / (std + eps)
    s = math.sqrt(((0.5 - 1.75) ** 2 + (3 - 1.75) ** 2) / 1)
    assert info.advantages[[4, 5]].tolist() == pytest.approx([-1.25 / s, 1.25 / s], rel=1e-5)

    logp = model(tokens)
    loss, _ = p.loss(logp, logp.detach(), mask, info)
    # one token-mean over the GT tokens of row 3 (NLL) and rollout tokens of rows 4, 5 (PG, rho=1)
    adv = info.advantages.to(D)
    n = mask[3].sum() + mask[4].sum() + mask[5].sum()
    # value: the PG token loss at rho = 1 is -A; gradient: that of -A logp
    value = (-(logp[3] * mask[3]).sum() - sum(adv[j] * mask[j].sum() for j in (4, 5))) / n
    assert loss.item() == pytest.approx(value.item(), abs=1e-12)
    surrogate = (-(logp[3] * mask[3]).sum() - sum(adv[j] * (logp[j] * mask[j]).sum() for j in (4, 5))) / n
    assert torch.allclose(_grad(loss, model), _grad(surrogate, model), atol=1e-12)


def test_hpt_correct_flag_and_threshold():
    g, gt = ids([0, 0, 0]), flags([False, False, True])
    r = torch.tensor([0.4, 0.6, 1.0], dtype=D)
    # default threshold 1.0 (>=): rollouts .4, .6 are wrong -> SFT (the GT's 1.0 does not count)
    assert get_paradigm("hpt").compute_row_info(RowBatch(r, g, gt)).sft_rows.tolist() == [False, False, True]
    # threshold .6, inclusive: row 1 correct -> RL on the rollouts
    loose = get_paradigm("hpt", correct_threshold=0.6)
    assert loose.compute_row_info(RowBatch(r, g, gt)).pg_rows.tolist() == [True, True, False]
    # threshold .7: none correct -> SFT
    strict = get_paradigm("hpt", correct_threshold=0.7)
    assert strict.compute_row_info(RowBatch(r, g, gt)).sft_rows.tolist() == [False, False, True]
    # an explicit correct flag wins over the threshold
    info = loose.compute_row_info(RowBatch(r, g, gt, correct=flags([False, False, True])))
    assert info.sft_rows.tolist() == [False, False, True]  # the GT's own flag does not count
    info = get_paradigm("hpt").compute_row_info(RowBatch(r, g, gt, correct=flags([True, False, False])))
    assert info.pg_rows.tolist() == [True, True, False]
    # min_correct = 2 needs two correct rollouts
    info = get_paradigm("hpt", correct_threshold=0.6, min_correct=2).compute_row_info(RowBatch(r, g, gt))
    assert info.sft_rows.tolist() == [False, False, True]


# ---------------------------------------------------------------------------------------------
# dynamic sampling filter
# ---------------------------------------------------------------------------------------------
def test_filter_groups():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 5.0, 3.0, 3.0])
    g = ids([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4])
    gt = flags([False, False, False, True, False, False, True, False, False, True, False, False])
    keep = filter_groups(r, g, gt)
    # g0: rollouts all 0 (GT 1 ignored) -> dropped with its GT; g1: [0, 1] -> kept with GT;
    # g2: [2, 2] -> dropped; g3: GT only, no rollouts -> dropped; g4 (no GT) [3, 3] -> dropped
    assert keep.tolist() == [False] * 4 + [True] * 3 + [False] * 5
    # order-independent and id-agnostic
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(filter_groups(r[perm], g[perm] * 7 - 3, gt[perm]), keep[perm])
    # without is_gt every row is a rollout; with atol small differences count as equal
    assert filter_groups(torch.tensor([1.0, 1.05]), ids([0, 0])).tolist() == [True, True]
    assert filter_groups(torch.tensor([1.0, 1.05]), ids([0, 0]), atol=0.1).tolist() == [False, False]


# ---------------------------------------------------------------------------------------------
# config wiring
# ---------------------------------------------------------------------------------------------
def test_paradigm_from_algorithm_config():
    from visurf_megatron.config import AlgorithmConfig

    p = paradigm_from_config(AlgorithmConfig())
    assert p.name == "visurf" and p.smooth and p.agg == "token-mean" and p.std_ddof == 1
    cfg = AlgorithmConfig(paradigm="luffy", luffy_gamma=0.3, loss_agg="seq-mean-token-sum", clip_high=0.28)
    p = paradigm_from_config(cfg)
    assert (p.name, p.gamma, p.agg, p.clip_high) == ("luffy", 0.3, "seq-mean-token-sum", 0.28)
    p = paradigm_from_config(AlgorithmConfig(paradigm="sft_then_rlvr", sft_then_rlvr_switch_step=7))
    assert p.switch_step == 7 and p.uses_gt_rows(6) and not p.uses_gt_rows(7)
    p = paradigm_from_config(AlgorithmConfig(paradigm="chord", chord_mu_schedule="constant", chord_mu_start=0.4))
    assert p.mu(123) == 0.4
    p = paradigm_from_config(AlgorithmConfig(paradigm="hpt", hpt_correct_threshold=2.0))
    assert p.correct_threshold == 2.0
    for name in ("sft", "rlvr"):
        assert paradigm_from_config(AlgorithmConfig(paradigm=name)).name == name
