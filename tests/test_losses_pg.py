"""KL-regularised policy gradient (LOSSES.md §0.2, §6): KL estimators, RPG surrogates, advantage estimators, policy
terms and the presets, against shared/spec/testvectors.out, exact enumeration and hand-worked examples.

Gradients are autograd's, w.r.t. the policy log-prob s = log π_θ (every term depends on θ only through s).
"""

import math
import re

import pytest
import torch
from helpers import ctx_for
from torch.testing import assert_close

import losses
from losses import Batch, LossContext
from losses.pg import advantages as adv_mod
from losses.pg import kl as kl_mod
from losses.pg import policy as pg
from losses.pg.objective import KLPGOptions

PRESETS = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "rpg_ufkl", "rpg_urkl"]


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def grad_of(value: torch.Tensor, wrt: torch.Tensor) -> float:
    return torch.autograd.grad(value, wrt)[0].item()


# ------------------------------------------------------------------------------------------------- KL estimators
@pytest.mark.parametrize("name, value, dvalue", [
    ("k1", 0.5, 0.9999999999732445),
    ("k2", 0.125, 0.49999999997968336),
    ("k3", 0.10653065971263342, 0.39346934027628677),
    ("k3+", 0.10653065971263342, 0.5),  # value of k3, gradient of k2 (= δ)
])
def test_kl_estimators_match_spec_vectors(name, value, dvalue):
    """testvectors.out, "KL estimators": s = −1.0, s_ref = −1.5 (δ = 0.5)."""
    s = scalar(-1.0)
    k = kl_mod.LOSS_KL[name](s, torch.tensor(-1.5, dtype=torch.float64))
    assert k.item() == pytest.approx(value, abs=1e-12)
    assert grad_of(k, s) == pytest.approx(dvalue, abs=1e-9)


def test_k3_clamps_as_verl():
    """verl low_var_kl: −δ clamped to [−20, 20] before exp, the value to [−10, 10]; clamped → zero gradient."""
    s = torch.tensor([-30.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, -30.0, -1.0], dtype=torch.float64)
    k = kl_mod.k3(s, ref)
    assert k.tolist() == [10.0, pytest.approx(10.0), 0.0]  # δ = −30: e^{30} huge → 10; δ = 30: 30 − 1 → 10
    k.sum().backward()
    assert s.grad.tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------- RPG surrogates
W, A, BETA = 1.2, 0.5, 0.1  # testvectors.py: w = π/π_old = 1.2, A = R − b = 0.5, β = 0.1, s_old = 0


@pytest.mark.parametrize("name, value, dvalue, const", [
    ("rpg_ufkl", -0.598232, -0.58, 0.0),
    ("rpg_urkl", -0.698121, -0.578121, -BETA),  # code form w(log w − 1) + 1 = Table 1's (w log w − w) + 1
    ("rpg_rkl", -0.578121, -0.458121, 0.0),
    ("rpg_fkl", -0.618232, -0.7, 0.0),  # −log w = −s when s_old = 0: Table 1's −β log π_θ
])
def test_rpg_surrogates_match_spec_vectors(name, value, dvalue, const):
    """Table-1 surrogate −wA + β·KL(w), differentiable through w (RPG code mapping), at w = 1.2, A = 0.5, β = 0.1:
    value and d/ds equal testvectors.out ("RPG surrogate losses"), i.e. the paper's gradient column."""
    s = scalar(math.log(W))
    old = torch.tensor(0.0, dtype=torch.float64)
    w = (s - old).exp()
    surrogate = -w * A + BETA * kl_mod.LOSS_KL[name](s, old) + const
    assert surrogate.item() == pytest.approx(value, abs=1e-6)
    assert grad_of(surrogate, s) == pytest.approx(dvalue, abs=1e-6)


@pytest.mark.parametrize("kl, dvalue", [("rpg_ufkl", -0.58), ("rpg_urkl", -0.578121), ("rpg_rkl", -0.458121),
                                        ("rpg_fkl", -0.7)])
def test_rpg_reinforce_gradient_equals_surrogate_gradient(kl, dvalue):
    """RPG-REINFORCE −sg(Â·w̄ + KL_t(w̄))·s has the gradient of the differentiable surrogate (RPG Table 2 / App. F):
    at w = 1.2 inside (0.8, 1.28), d/ds = the spec's gradient column."""
    s = torch.tensor([[math.log(W)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.full((1, 1), A, dtype=torch.float64)
    for fn in (pg.rpg_reinforce, pg.rpg_reinforce_clip):
        args = (s, old, adv, kl, BETA, 0.2, 0.28) + ((10.0,) if fn is pg.rpg_reinforce_clip else ())
        term = fn(*args)
        assert grad_of(term.loss.sum(), s) == pytest.approx(dvalue, abs=1e-6), fn.__name__
        assert not term.clipped.any()


def test_k3_with_ratio_weight_under_iterative_reference_is_rpg_urkl():
    """ρ·k3(s, s_old) = ρ(1/ρ − 1 + log ρ) = 1 − ρ + ρ log ρ = rpg_urkl: RPG's corrected GRPO KL (TRL
    use_bias_correction_kl) is the URKL surrogate — values and gradients."""
    s = torch.linspace(-2.0, -0.2, 7, dtype=torch.float64).requires_grad_()
    old = torch.linspace(-1.5, -0.5, 7, dtype=torch.float64)
    a = kl_mod.k3(s, old) * (s - old).exp()
    b = kl_mod.rpg_urkl(s, old)
    assert_close(a, b)
    assert_close(torch.autograd.grad(a.sum(), s)[0], torch.autograd.grad(b.sum(), s)[0])


# ------------------------------------------------------------------------------------- exact enumeration, 3 tokens
Z = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64)  # testvectors.py's logits of π_θ
ZR = torch.tensor([0.0, 0.4, -0.2], dtype=torch.float64)  # and of π_ref


def kl_div(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum()


def expected_grad(per_token_loss, sample_logits=None):
    """∇_z E_{y ~ π_sample}[ℓ(s_y(z), s_ref_y)] by enumerating the 3 tokens; π_sample = π_θ (on-policy, detached)
    unless `sample_logits` is given."""
    z = Z.clone().requires_grad_()
    logp = torch.log_softmax(z, 0)
    ref = torch.log_softmax(ZR, 0)
    sample = torch.softmax(Z if sample_logits is None else sample_logits, 0)
    value = (sample * per_token_loss(logp, ref)).sum()
    return value, torch.autograd.grad(value, z)[0]


def grad_kl(direction: str) -> torch.Tensor:
    z = Z.clone().requires_grad_()
    logp, ref = torch.log_softmax(z, 0), torch.log_softmax(ZR, 0)
    value = kl_div(logp, ref) if direction == "reverse" else kl_div(ref, logp)
    return torch.autograd.grad(value, z)[0]


def test_k3_as_loss_gives_forward_kl_gradient_and_k2_reverse():
    """On-policy, exactly: E[∇ k3-loss] = ∇ KL(π_ref‖π_θ) and E[∇ k2-loss] = ∇ KL(π_θ‖π_ref) (LOSSES.md §0.2),
    with the numbers of testvectors.out."""
    _, g3 = expected_grad(kl_mod.k3)
    _, g2 = expected_grad(kl_mod.k2)
    assert_close(g3, grad_kl("forward"), rtol=0, atol=1e-12)
    assert_close(g2, grad_kl("reverse"), rtol=0, atol=1e-12)
    assert_close(g3, torch.tensor([0.036186, -0.245467, 0.209281], dtype=torch.float64), rtol=0, atol=1e-6)
    assert_close(g2, torch.tensor([-0.014765, -0.193599, 0.208364], dtype=torch.float64), rtol=0, atol=1e-6)


def test_k1_as_loss_has_zero_expected_gradient_and_k3_plus_and_ratio_weighted_k3_are_reverse_kl():
    """E[∇ k1] = 0 (why k1 belongs in the reward); k3+ (gradient of k2) and ρ·k3 with a non-detached ρ (RPG
    correction, π_old = π_θ) both give ∇ KL(π_θ‖π_ref)."""
    _, g1 = expected_grad(kl_mod.k1)
    _, g3p = expected_grad(kl_mod.k3_plus)
    old = torch.log_softmax(Z, 0)  # π_old = π_θ, constant
    _, g3w = expected_grad(lambda s, ref: (s - old).exp() * kl_mod.k3(s, ref))
    assert_close(g1, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert_close(g3p, grad_kl("reverse"), rtol=0, atol=1e-12)
    assert_close(g3w, grad_kl("reverse"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, direction", [("rpg_fkl", "forward"), ("rpg_ufkl", "forward"),
                                             ("rpg_rkl", "reverse"), ("rpg_urkl", "reverse")])
def test_rpg_surrogates_are_their_divergences_in_expectation(name, direction):
    """RPG Table 1 / App. D: with samples from the reference (π_old under the iterative reference), the surrogate's
    expectation *is* the divergence (UKL = KL for normalised policies) and so is its gradient."""
    value, grad = expected_grad(kl_mod.LOSS_KL[name], sample_logits=ZR)
    ref, logp = torch.log_softmax(ZR, 0), torch.log_softmax(Z, 0)
    target = kl_div(logp, ref) if direction == "reverse" else kl_div(ref, logp)
    assert value.item() == pytest.approx(target.item(), abs=1e-12)
    assert_close(grad, grad_kl(direction), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------- advantages
# Worked example: group 0 = rewards (1, 0, 0, 1), group 1 = (0.5, 0.5) (all equal), group 2 = (2,) (alone).
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0])
G = torch.tensor([7, 7, 7, 7, 3, 3, 9])  # arbitrary ids
MASK = torch.tensor([[False, True, True]] * 7)


def test_group_norm_worked_example():
    """Group 0: μ = 0.5, σ (Bessel) = sqrt(4·0.25/3) = 0.57735 → ±0.5/(σ + ε); equal rewards → 0; alone → 0."""
    a = adv_mod.group_norm(R, G, MASK, None, 1e-4)
    sigma = math.sqrt(1 / 3)
    expect = [0.5 / (sigma + 1e-4), -0.5 / (sigma + 1e-4), -0.5 / (sigma + 1e-4), 0.5 / (sigma + 1e-4), 0, 0, 0]
    assert_close(a[:, 1], torch.tensor(expect))
    assert_close(a[:, 1], a[:, 2])
    assert (a[:, 0] == 0).all()  # zero off the mask


def test_group_mean_rloo_and_batch_mean_worked_examples():
    """Dr.GRPO R − μ_g; RLOO R_i − mean_{j≠i} R_j (= (4/3)(R − μ), e.g. 1 − (0+0+1)/3 = 2/3); batch mean."""
    assert_close(adv_mod.group_mean(R, G, MASK, None, 0)[:, 1], torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0]))
    assert_close(adv_mod.rloo(R, G, MASK, None, 0)[:, 1], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0]))
    assert_close(adv_mod.batch_mean(R, None, MASK, None, 0)[:, 1], R - R.mean())


def test_group_norm_equals_trl_grpo_formula():
    """TRL GRPOTrainer (scale_rewards="group"): (R − mean_g)/(nanstd_g + 1e-4), with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    rewards = torch.rand(12)
    groups = torch.arange(3).repeat_interleave(4)
    grouped = rewards.view(-1, 4)
    trl = (rewards - grouped.mean(1).repeat_interleave(4)) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    ours = adv_mod.group_norm(rewards, groups, torch.ones(12, 2, dtype=torch.bool), None, 1e-4)[:, 0]
    assert_close(ours, trl, rtol=0, atol=1e-6)


def test_rloo_equals_verl_and_trl_formulas_with_kl_in_reward():
    """RLOO with KL in the reward at sequence level (TRL RLOOTrainer): R' = R − β Σ_t (s_old − s_ref), then the
    leave-one-out baseline; checked against TRL's (Σ_g R' − R')/(G − 1) and verl's
    compute_rloo_outcome_advantage (R'·G/(G−1) − mean_g·G/(G−1))."""
    torch.manual_seed(1)
    B, T, G_ = 8, 5, 4
    rewards = torch.rand(B)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = False
    mask[:, 1] = True
    old, ref = torch.randn(B, T), torch.randn(B, T)
    beta = 0.05
    penalty = beta * kl_mod.k1(old, ref)
    groups = torch.arange(B) // G_
    ours = adv_mod.rloo(rewards, groups, mask, penalty, 0.0)

    shaped = rewards - beta * ((old - ref) * mask).sum(-1)  # TRL: kl summed over completion tokens
    grouped = shaped.view(-1, G_)
    trl = (shaped - ((grouped.sum(1, keepdim=True) - grouped) / (G_ - 1)).view(-1))
    mean = grouped.mean(1).repeat_interleave(G_)
    verl = shaped * G_ / (G_ - 1) - mean * G_ / (G_ - 1)
    assert_close(ours[:, 1], trl, rtol=0, atol=1e-6)
    assert_close(ours[:, 1], verl, rtol=0, atol=1e-6)
    assert_close(ours, ours[:, 1:2] * mask)  # broadcast over the completion, zero elsewhere


def test_reinforce_pp_worked_example():
    """REINFORCE++ (OpenRLHF): r_t = R·1[t = EOS] − p_t, G_t = Σ_{u≥t} r_u, whitened over all loss tokens.

    Row 0: tokens 1..3, R = 1, p = (0.1, 0.2, 0.3) → r = (−0.1, −0.2, 0.7) → G = (0.4, 0.5, 0.7).
    Row 1: tokens 1..2, R = 0, p = (0.1, 0.1)      → r = (−0.1, −0.1)      → G = (−0.2, −0.1).
    Mean 1.3/5 = 0.26; population var = Σ(G − 0.26)²/5; Â = (G − 0.26)/sqrt(var).
    """
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    penalty = torch.tensor([[9.0, 0.1, 0.2, 0.3], [9.0, 0.1, 0.1, 9.0]])  # off-mask values must not matter
    a = adv_mod.reinforce(torch.tensor([1.0, 0.0]), None, mask, penalty, 0.0)
    g = torch.tensor([0.4, 0.5, 0.7, -0.2, -0.1])
    var = ((g - 0.26) ** 2).mean()
    assert_close(a[mask], (g - 0.26) / var.sqrt())
    assert a[~mask].abs().max() == 0


def test_reinforce_baseline_subtracts_group_mean_before_the_returns():
    """REINFORCE++-baseline: R − μ_g, then the same returns and whitening; with no KL penalty and one token per
    row that is whiten(R − μ_g)."""
    mask = torch.tensor([[False, True]] * 4)
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    a = adv_mod.reinforce_baseline(rewards, groups, mask, None, 0.0)[:, 1]
    centered = torch.tensor([0.5, -0.5, 1.0, -1.0])
    assert_close(a, (centered - centered.mean()) / centered.var(unbiased=False).sqrt())


def test_group_estimators_need_group_ids():
    with pytest.raises(ValueError, match="batch.group_ids is None"):
        adv_mod.group_norm(R, None, MASK, None, 1e-4)


# ------------------------------------------------------------------------------------------------- policy terms
@pytest.mark.parametrize("ratio, value, dvalue", [(0.7, -0.7, -0.7), (1.0, -1.0, -1.0), (1.1, -1.1, -1.1),
                                                  (1.4, -1.28, 0.0)])
def test_ppo_clip_matches_psft_vectors(ratio, value, dvalue):
    """testvectors.out "PSFT": PPO clip with Â = 1, ε_low = 0.2, ε_high = 0.28 (s_old = 0)."""
    s = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    term = pg.ppo_clip(s, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), 0.2, 0.28)
    assert term.loss.item() == pytest.approx(value, abs=1e-9)
    assert grad_of(term.loss.sum(), s) == pytest.approx(dvalue, abs=1e-9)


def test_ppo_clip_and_dual_clip_gradient_masks():
    """Which tokens keep a gradient (ε = 0.2, c = 3): Â > 0 is cut above 1.2; Â < 0 is cut below 0.8 and, with the
    dual clip, above c where the loss is the constant −cÂ."""
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5, 4.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    s = ratio.log().requires_grad_()
    old = torch.zeros_like(ratio)
    plain = pg.ppo_clip(s, old, adv, 0.2, 0.2)
    g_plain = torch.autograd.grad(plain.loss.sum(), s)[0]
    dual = pg.ppo_clip(s, old, adv, 0.2, 0.2, dual_clip=3.0)
    g_dual = torch.autograd.grad(dual.loss.sum(), s)[0]
    expect_plain = -adv * ratio * torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.float64)  # d(−ρÂ)/ds = −ρÂ
    expect_dual = -adv * ratio * torch.tensor([1, 1, 0, 0, 1, 1, 0], dtype=torch.float64)
    assert_close(g_plain, expect_plain)
    assert_close(g_dual, expect_dual)
    assert dual.loss[-1].item() == pytest.approx(3.0)  # −cÂ
    assert plain.loss[-1].item() == pytest.approx(4.0)  # −ρÂ, unbounded without the dual clip
    assert plain.clipped.tolist() == [False, False, True, True, False, False, False]
    assert dual.clipped.tolist() == [False, False, True, True, False, False, True]


def test_sequence_ppo_clip_is_trl_rloo_loss():
    """TRL RLOOTrainer._compute_loss: ρ_i = exp(Σ_t m s − Σ_t m s_old), −min(ρÂ, clip(ρ)Â), mean over sequences."""
    torch.manual_seed(2)
    B, T = 6, 5
    mask = torch.rand(B, T) > 0.3
    mask[:, 0], mask[:, 1] = False, True
    s = (torch.rand(B, T, dtype=torch.float64) * -2).requires_grad_()
    old = (s.detach() + 0.15 * torch.randn(B, T, dtype=torch.float64)) * mask
    adv_seq = torch.randn(B, dtype=torch.float64)
    adv = adv_seq[:, None] * mask
    term = pg.sequence_ppo_clip(s * mask, old, adv, mask, 0.2, 0.2)
    ours = losses.aggregate(term.loss, mask, term.reduce, ctx_for(mask))
    coef_1 = ((s * mask).sum(1) - old.sum(1)).exp()
    trl = -torch.min(coef_1 * adv_seq, coef_1.clamp(0.8, 1.2) * adv_seq).mean()
    assert_close(ours, trl)
    assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(trl, s)[0])


def test_reinforce_and_is_reinforce_gradients():
    """−Â·s has d/ds = −Â; IS-REINFORCE weights it by sg(clip(ρ, 0.8, 1.2))."""
    ratio = torch.tensor([0.5, 1.1, 2.0], dtype=torch.float64)
    s = ratio.log().requires_grad_()
    adv = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    old = torch.zeros(3, dtype=torch.float64)
    assert_close(torch.autograd.grad(pg.reinforce(s, old, adv).loss.sum(), s)[0], -adv)
    term = pg.is_reinforce(s, old, adv, 0.2, 0.2)
    assert_close(torch.autograd.grad(term.loss.sum(), s)[0], -adv * torch.tensor([0.8, 1.1, 1.2], dtype=torch.float64))
    assert term.clipped.tolist() == [True, False, True]


def test_rpg_reinforce_clip_switches_the_gradient_off_where_ppo_clips():
    """RPG Alg. 2: gradient −(Â·w + KL_t) inside the trust region, none where PPO's clip (or the dual clip c)
    binds; the plain RPG-REINFORCE keeps a gradient everywhere with the weight at the clip boundary."""
    w = torch.tensor([1.1, 1.5, 0.5, 0.9, 1.5, 20.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    s = (w.log() - 1.0).requires_grad_()  # s_old = −1
    old = torch.full_like(w, -1.0)
    beta = 0.1
    term = pg.rpg_reinforce_clip(s, old, adv, "rpg_ufkl", beta, 0.2, 0.28, dual_clip=10.0)
    g = torch.autograd.grad(term.loss.sum(), s)[0]
    inside = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.float64)
    w_bar = w.clamp(0.8, 1.28)
    assert_close(g, -(adv * w + beta * (1 - w_bar)) * inside)
    assert term.clipped.tolist() == [False, True, True, False, False, True]
    plain = pg.rpg_reinforce(s, old, adv, "rpg_ufkl", beta, 0.2, 0.28)
    assert_close(torch.autograd.grad(plain.loss.sum(), s)[0], -(adv * w_bar + beta * (1 - w_bar)))


# ------------------------------------------------------------------------------------------------- the loss objects
def make_batch(B=8, T=7, group_size=4, seed=0, extras=True):
    """Hand-built experience: random masks, rewards, group ids, and old/ref log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0], mask[:, 1] = False, True
    s = (torch.rand(B, T, generator=g, dtype=torch.float64) * -3) * mask
    ex = {
        "reward": (torch.rand(B, generator=g) > 0.5).float(),
        "old_logprobs": (s + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)) * mask,
        "ref_logprobs": (s + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)) * mask,
    }
    batch = Batch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), mask,
                  torch.arange(B) // group_size, ex if extras else {})
    return s.requires_grad_(), batch


def build(name, **options):
    cls = losses.get_loss_class(name)
    return cls(cls.Options(**options))


@pytest.mark.parametrize("name, options", [(p, {}) for p in PRESETS] + [
    ("kl_pg", dict(aggregation="token_mean", beta=0.1, kl_weight="ratio")),
    ("kl_pg", dict(advantage="reinforce_baseline", kl="k2", beta=0.1, aggregation="seq_mean_token_sum")),
    ("kl_pg", dict(policy="rpg_reinforce_clip", kl="rpg_urkl", beta=0.1, reference="iterative",
                   dual_clip=10.0, epsilon_high=0.28)),
])
def test_one_micro_batch_of_8_equals_8_micro_batches_of_1(name, options):
    """Advantages are made once on the whole experience batch (prepare); the per-micro-batch shares then sum to the
    full-batch loss and gradient, for every preset's aggregation (A1, A3, A5, sequence mean)."""
    loss_fn = build(name, **options)
    s, batch = make_batch()
    B, T = batch.input_ids.shape
    ctx = LossContext(num_tokens=float(batch.loss_mask.sum()), num_sequences=B, num_micro_batches=1, max_length=T)
    batch = loss_fn.prepare(batch, ctx)
    full, metrics = loss_fn(s, batch, ctx)
    g_full = torch.autograd.grad(full, s)[0]
    split_ctx = LossContext(num_tokens=ctx.num_tokens, num_sequences=B, num_micro_batches=B, max_length=T)
    total = sum(loss_fn(s[i : i + 1], batch.select([i], crop=False), split_ctx)[0] for i in range(B))
    assert_close(total, full, rtol=0, atol=1e-12)
    assert_close(torch.autograd.grad(total, s)[0], g_full, rtol=0, atol=1e-12)
    assert g_full.abs().sum() > 0
    for key in ("pg_loss", "clip_frac", "ratio_mean", "ratio_max", "adv_mean", "adv_std", "kl_old", "reward_mean"):
        assert math.isfinite(metrics[key]), key


def test_grpo_preset_by_hand():
    """grpo = A3 of [−min(ρÂ, clip(ρ)Â) + 0.04·k3], Â = (R − μ_g)/(σ_g + 1e-4), written out directly."""
    s, batch = make_batch(seed=3)
    loss_fn = losses.get_loss_class("grpo")()
    ctx = ctx_for(batch.loss_mask)
    batch = loss_fn.prepare(batch, ctx)
    loss, metrics = loss_fn(s, batch, ctx)
    m = batch.loss_mask.double()
    r = batch.extras["reward"].view(2, 4)
    a = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1).double()
    rho = (s - batch.extras["old_logprobs"]).exp()
    d = batch.extras["ref_logprobs"] - s
    per = -torch.min(rho * a, rho.clamp(0.8, 1.2) * a) + 0.04 * (d.exp() - d - 1)
    expect = ((per * m).sum(1) / m.sum(1)).mean()
    assert_close(loss, expect)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(expect, s)[0])
    k3_mean = ((d.exp() - d - 1) * m).sum() / m.sum()
    assert metrics["kl_ref"] == pytest.approx(k3_mean.item()) and metrics["kl_term"] == pytest.approx(k3_mean.item())


def test_dr_grpo_uses_max_completion_length():
    """A5 divides by B·T_max; T_max = max_completion_length when set (TRL), else the context's max_length."""
    s, batch = make_batch(seed=4)
    ctx = ctx_for(batch.loss_mask, max_length=100)
    default = build("dr_grpo")
    batch = default.prepare(batch, ctx)
    a, _ = default(s, batch, ctx)
    b, _ = build("dr_grpo", max_completion_length=25)(s, batch, ctx)
    assert b.item() == pytest.approx(a.item() * 4)


def test_iterative_reference_uses_old_logprobs_and_needs_no_reference_model():
    """rpg_ufkl: K = w − log w − 1 with w = π_θ/π_old; ref_logprobs are neither needed nor read."""
    loss_fn = losses.get_loss_class("rpg_ufkl")()
    assert loss_fn.needs == {"rewards", "old_logprobs"}
    s, batch = make_batch(seed=5)
    del batch.extras["ref_logprobs"]
    ctx = ctx_for(batch.loss_mask)
    batch = loss_fn.prepare(batch, ctx)
    loss, metrics = loss_fn(s, batch, ctx)
    pg_only, _ = build("rpg_ufkl", beta=0.0)(s, batch, ctx)
    log_w = s - batch.extras["old_logprobs"]
    kl = ((log_w.exp() - log_w - 1) * batch.loss_mask).sum() / batch.loss_mask.sum()
    assert_close(loss, pg_only + 1e-4 * kl)
    assert "kl_ref" not in metrics and metrics["kl_term"] == pytest.approx(kl.item())


@pytest.mark.parametrize("options, needs", [
    (dict(), {"rewards", "old_logprobs"}),  # kl_pg defaults: β = 0, no reference model
    (dict(beta=0.1), {"rewards", "old_logprobs", "ref_logprobs"}),
    (dict(beta=0.1, reference="iterative", minibatches=2), {"rewards", "old_logprobs"}),
    (dict(reward_kl="k1", reward_beta=0.05), {"rewards", "old_logprobs", "ref_logprobs"}),
])
def test_needs_follow_the_options(options, needs):
    assert build("kl_pg", **options).needs == needs


def test_preset_defaults_are_the_documented_ones():
    """LOSSES.md §6.2/§6.3 defaults, per preset."""
    o = {p: losses.get_loss_class(p).Options() for p in PRESETS}
    assert (o["grpo"].advantage, o["grpo"].kl, o["grpo"].beta, o["grpo"].kl_weight, o["grpo"].aggregation,
            o["grpo"].epsilon_low, o["grpo"].epsilon_high) == ("group_norm", "k3", 0.04, "one",
                                                               "seq_mean_token_mean", 0.2, 0.2)
    assert (o["dr_grpo"].advantage, o["dr_grpo"].aggregation, o["dr_grpo"].beta) == ("group_mean", "token_sum_norm", 0)
    assert (o["rloo"].advantage, o["rloo"].reward_kl, o["rloo"].reward_beta, o["rloo"].policy, o["rloo"].beta) == (
        "rloo", "k1", 0.05, "seq_ppo_clip", 0.0)
    assert (o["reinforce_pp"].advantage, o["reinforce_pp"].reward_kl, o["reinforce_pp"].reward_beta) == (
        "reinforce", "k1", 0.01)
    for p, kl in (("rpg_ufkl", "rpg_ufkl"), ("rpg_urkl", "rpg_urkl")):
        assert (o[p].advantage, o[p].epsilon_low, o[p].epsilon_high, o[p].dual_clip, o[p].kl, o[p].beta,
                o[p].reference, o[p].aggregation) == ("group_mean", 0.2, 0.28, 10.0, kl, 1e-4, "iterative",
                                                      "token_mean")


def test_missing_or_misshapen_reward_is_a_clear_error():
    loss_fn = losses.get_loss_class("grpo")()
    s, batch = make_batch()
    del batch.extras["reward"]
    with pytest.raises(ValueError, match=r"needs batch.extras\['reward'\] of shape \(8,\).*got nothing"):
        loss_fn.prepare(batch, ctx_for(batch.loss_mask))
    batch.extras["reward"] = torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"got shape \(8, 2\)"):
        loss_fn.prepare(batch, ctx_for(batch.loss_mask))
    batch.extras["reward"] = torch.tensor([0.0, 1.0, float("nan"), 0, 0, 0, float("inf"), 0])
    batch.extras["index"] = torch.arange(10, 18)
    with pytest.raises(ValueError, match=r"NaN/inf at rows \[2, 6\] \(dataset rows \[12, 16\]\)"):
        loss_fn.prepare(batch, ctx_for(batch.loss_mask))
    _, batch = make_batch()
    with pytest.raises(RuntimeError, match="call loss.prepare"):
        loss_fn(s, batch, ctx_for(batch.loss_mask))


@pytest.mark.parametrize("options, message", [
    (dict(advantage="grpo"), "advantage must be one of group_norm"),
    (dict(policy="ppo"), "policy must be one of"),
    (dict(kl="k4"), "kl must be one of"),
    (dict(dual_clip=0.5), "dual_clip must be > 1"),
    (dict(epsilon_low=1.0), r"epsilon_low must be in \[0, 1\)"),
    (dict(beta=-1.0), "beta must be ≥ 0"),
    (dict(beta=0.1, kl="none"), "but kl is 'none'"),
    (dict(reward_beta=0.1), "but reward_kl is 'none'"),
    (dict(kl="rpg_ufkl", beta=0.1, kl_weight="ratio"), "already carries the ratio"),
    (dict(policy="rpg_reinforce", kl="k3", reference="iterative"), "kl must be one of rpg_fkl"),
    (dict(policy="rpg_reinforce", kl="rpg_ufkl"), "set reference: iterative"),
    (dict(policy="seq_ppo_clip", advantage="reinforce"), "needs one advantage per sequence"),
    (dict(kl="rpg_ufkl", beta=1e-4, reference="iterative"), "zero gradient; set minibatches > 1"),
    (dict(epochs=0), "epochs must be a whole number >= 1"),  # the shared check of losses/options.py
    (dict(minibatches=0), "minibatches must be a whole number >= 1"),
    (dict(aggregation="mean"), "aggregation must be one of token_mean"),
    (dict(max_completion_length=0), "max_completion_length must be > 0"),
])
def test_bad_options_are_rejected_with_the_reason(options, message):
    with pytest.raises(losses.OptionError, match=message):
        build("kl_pg", **options)


def test_config_rejects_a_misspelled_component_name():
    """Through the config loader: a Literal option gets the nearest valid value."""
    from align.config import LossConfig, build_loss
    from align.configio import ConfigError

    with pytest.raises(ConfigError, match="'group_nrom' is not one of.*did you mean 'group_norm'"):
        build_loss(LossConfig(name="kl_pg", options={"advantage": "group_nrom"}))


def test_align_losses_lists_every_preset_with_commented_options():
    from align.introspect import describe_losses

    text = describe_losses()
    for name in ["kl_pg"] + PRESETS:
        assert f"\n{name}: " in "\n" + text, name
    grpo = describe_losses("grpo")
    assert "beta = 0.04  # DeepSeekMath" in grpo  # the preset's own comment
    assert "epsilon_low = 0.2  # clip range below" in grpo  # inherited from kl_pg's Options
    assert all("#" in line for line in grpo.splitlines()[2:]), grpo  # every option is commented


# ------------------------------------------------------------------------------------------------- learning signal
def _toy_policy_run(loss_fn, iterations=25, seed=0):
    """A tabular policy over sequences of 3 tokens (vocabulary 4, independent logits per position); reward = share
    of tokens equal to 2. The loop mirrors the trainer: sample groups from π_θ, old/ref log-probs, prepare once,
    then `epochs` × `minibatches` optimizer steps. Returns the exact expected reward before and after."""
    torch.manual_seed(seed)
    T, V, prompts, group = 4, 4, 4, 4
    B = prompts * group
    logits = torch.zeros(T - 1, V, dtype=torch.float64, requires_grad=True)
    ref_logits = logits.detach().clone()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False

    def logprobs(table, ids):
        lp = torch.log_softmax(table, -1)  # (T−1, V)
        out = lp.gather(1, ids[:, 1:].T).T  # (B, T−1)
        return torch.cat([torch.zeros(len(ids), 1, dtype=out.dtype), out], 1)

    def expected_reward():
        return torch.softmax(logits.detach(), -1)[:, 2].mean().item()

    before = expected_reward()
    for _ in range(iterations):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, -1), B, replacement=True).T  # (B, T−1)
            ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens], 1)
            extras = {"reward": (tokens == 2).float().mean(1), "old_logprobs": logprobs(logits, ids),
                      "ref_logprobs": logprobs(ref_logits, ids)}
        batch = Batch(ids, torch.ones(B, T, dtype=torch.bool), mask, torch.arange(B) // group, extras)
        batch = loss_fn.prepare(batch, ctx_for(mask))
        for _ in range(loss_fn.epochs):
            for rows in torch.arange(B).chunk(loss_fn.minibatches):
                micro = batch.select(rows, crop=False)
                loss, _ = loss_fn(logprobs(logits, micro.input_ids), micro, ctx_for(micro.loss_mask))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return before, expected_reward()


@pytest.mark.parametrize("name, options", [(p, {}) for p in PRESETS] + [
    ("kl_pg", dict(policy="reinforce", advantage="batch_mean")),
    ("kl_pg", dict(policy="is_reinforce", advantage="reinforce_baseline", kl="k2", beta=0.01, minibatches=2)),
    ("kl_pg", dict(policy="rpg_reinforce", kl="rpg_urkl", beta=1e-3, reference="iterative", epsilon_high=0.28)),
    ("kl_pg", dict(policy="rpg_reinforce_clip", kl="rpg_ufkl", beta=1e-3, reference="iterative", epochs=2)),
])
def test_every_configuration_raises_the_reward_of_a_toy_policy(name, options):
    """Signs end to end: each preset (and the REINFORCE-style policies) moves a toy policy towards the rewarded
    token, from 0.25 expected reward to well above it in 25 rollout batches."""
    before, after = _toy_policy_run(build(name, **options))
    assert before == pytest.approx(0.25)
    assert after > 0.6, after


def test_docs_rl_loss_examples_build():
    """The YAML examples of docs/rl.md's RL-losses section are valid loss configs."""
    import os

    import yaml

    from align.config import LossConfig, build_loss

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "rl.md"), encoding="utf-8").read()
    section = page.split("# RL losses (KL-regularised policy gradient)")[1].split("\n## ")[0]
    block = section.split("```yaml\n")[1].split("```")[0]
    entries = ["loss: " + e for e in block.strip().removeprefix("loss: ").split("\nloss: ")]
    assert len(entries) == 3
    for entry in entries:
        options = yaml.safe_load(entry)["loss"]
        build_loss(LossConfig(name=options.pop("name"), options=options))


@pytest.mark.parametrize("name", PRESETS)
def test_each_method_docstring_names_its_own_defaults(name):
    """Every ``option: value`` a method's docstring shows in its symbol → piece table is that method's default, and
    every piece it names exists, so the equation a reader sees is the one the class runs."""
    cls = losses.get_loss_class(name)
    doc, defaults = cls.__doc__, cls.Options()
    shown = re.findall(r"``(\w+): ([\w.+-]+)``", doc)
    assert shown, name
    for option, value in shown:
        actual = getattr(defaults, option)
        assert (str(actual) == value) if isinstance(actual, str) else actual == float(value), (name, option, value)
    modules = {"advantages": adv_mod, "kl": kl_mod, "policy": pg}
    for module, function in re.findall(r"``(advantages|kl|policy)\.(\w+)``", doc):
        assert callable(getattr(modules[module], function, None)), (name, module, function)
