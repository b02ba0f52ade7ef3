"""Best-of-N arithmetic and the BOND / vBoN / J-BOND losses, checked against exact enumeration and hand-worked values
(LOSSES.md §7, §10).

- The §7.1 BoN distribution equals exact enumeration of "draw N from π_ref, keep the best, ties uniformly" on the
  spec's toy (0.25, 0.39, 0.36) and on toys with ties; KL(π_BoN‖π_ref) ≤ log N − (N−1)/N with equality in the
  continuous limit.
- With the exact BoN log-ratio as reward and β = 1/(N−1), the optimum π_ref·exp(r/β) of KL-regularised RL is π_BoN,
  ties included; the plain log p_≤ reward is not when ties carry mass (binary rewards).
- The estimators on worked examples with ties: vBoN's F̂ = 0.4 and the unsmoothed p̂_≤ = 0.75 of the spec.
- Stop-gradients: the expected gradient of the `bond` / `vbon` loss over all tuples of on-policy samples (exact
  enumeration, 3-outcome policy) is (1/(N−1))·∇KL(π_θ ‖ π_ref·ŵ) — the reward, quantiles and baseline contribute none.
- `jbond` on a hand-made batch: the forward / backward split, the crude reward, the anchor KL in the reward, and
  gradients −(1−β)/P on the anchor rows and −β·Â/P on the policy rows.
"""

import itertools
import math

import pytest
import torch
from helpers import ctx_for

from losses import Batch
from losses.bon import (add_one_cdf, add_one_quantiles, bon_distribution, bon_kl, bon_kl_bound, bon_log_ratio,
                        expected_best_of_n, level_probabilities)
from losses.bond import BOND, VBoN, bon_ratio_reward, log_p_le_reward
from losses.jbond import JBOND
from losses.registry import get_loss_class
from rollouts.reference_rewards import rank_counts


def enumerate_bon(ref_probs, rewards, n):
    """Draw n i.i.d. outcomes, keep one of those with the highest reward uniformly at random: exact distribution."""
    K = len(ref_probs)
    out = [0.0] * K
    for draw in itertools.product(range(K), repeat=n):
        p = math.prod(ref_probs[i] for i in draw)
        best = max(rewards[i] for i in draw)
        winners = [i for i in draw if rewards[i] == best]
        for i in winners:
            out[i] += p / len(winners)
    return out


# ---------------------------------------------------------------------------------------------- §7.1 formula
def test_bon_formula_matches_the_spec_vector_and_enumeration():
    ref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    r = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(bon_distribution(ref, r, 2), torch.tensor([0.25, 0.39, 0.36], dtype=torch.float64))
    for n in (1, 2, 3, 5):
        torch.testing.assert_close(bon_distribution(ref, r, n),
                                   torch.tensor(enumerate_bon(ref.tolist(), r.tolist(), n), dtype=torch.float64))


@pytest.mark.parametrize("rewards", [[1.0, 2.0, 2.0, 3.0], [0.0, 1.0, 1.0, 0.0], [5.0, 5.0, 5.0, 5.0],
                                     [3.0, 1.0, 3.0, 2.0]])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_bon_formula_with_ties_matches_enumeration(rewards, n):
    ref = [0.4, 0.1, 0.3, 0.2]
    got = bon_distribution(torch.tensor(ref, dtype=torch.float64), torch.tensor(rewards), n)
    torch.testing.assert_close(got, torch.tensor(enumerate_bon(ref, rewards, n), dtype=torch.float64))
    assert abs(float(got.sum()) - 1) < 1e-12


def test_binary_reward_bon_is_pass_at_n_and_the_no_tie_approximation_is_far_off():
    """0/1 reward, P(correct) = p: π_BoN(correct set) = 1 − (1 − p)^N, while π_ref·N·p_≤^{N−1} would give N·p."""
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # outcomes 0, 1 correct: p = 0.3
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bon = bon_distribution(ref, r, 4)
    assert abs(float(bon[:2].sum()) - (1 - 0.7 ** 4)) < 1e-12
    p_lt, p_le = level_probabilities(ref, r)
    approx = ref * 4 * p_le ** 3
    assert float(approx[:2].sum()) == pytest.approx(1.2)  # > 1: not a distribution


def test_bon_kl_is_below_the_bound_and_reaches_it_without_ties():
    ref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for n in (2, 4, 8):
        assert bon_kl(ref, torch.tensor([1.0, 2.0, 3.0]), n) <= bon_kl_bound(n) + 1e-12
        assert bon_kl(ref, torch.tensor([1.0, 1.0, 3.0]), n) <= bon_kl_bound(n) + 1e-12
    K = 4000  # many distinct, equally likely outcomes: the continuous limit
    uniform = torch.full((K,), 1.0 / K, dtype=torch.float64)
    assert bon_kl(uniform, torch.arange(K, dtype=torch.float64), 4) == pytest.approx(bon_kl_bound(4), abs=2e-3)


def test_the_rl_optimum_with_the_bon_ratio_reward_is_bon_and_log_p_le_is_not_under_ties():
    """max_π E_π[r] − β KL(π‖π_ref) is solved by π_ref·exp(r/β)/Z. With r = log(π_BoN/π_ref)/(N−1), β = 1/(N−1): π_BoN
    exactly (ties included); with r = log p_≤ it is π_ref·p_≤^{N−1}/Z, which differs when rewards tie."""
    ref = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    n, beta = 4, 1.0 / 3
    for rewards in ([1.0, 2.0, 2.0, 3.0], [0.0, 1.0, 0.0, 0.0]):  # the second: 0/1, P(correct) = 0.1
        r = torch.tensor(rewards)
        p_lt, p_le = level_probabilities(ref, r)
        optimum = ref * (bon_log_ratio(p_lt, p_le, n) / (n - 1) / beta).exp()
        torch.testing.assert_close(optimum / optimum.sum(), bon_distribution(ref, r, n))
        plain = ref * (p_le.log() / beta).exp()
        assert (plain / plain.sum() - bon_distribution(ref, r, n)).abs().max() > 0.02


# ------------------------------------------------------------------------------------------------- estimators
def test_estimators_on_the_spec_example_with_ties():
    """Reference rewards (0.1, 0.5, 0.5, 0.9), r = 0.5 (LOSSES.md §10): b = 1 below, e = 2 tied, k = 4."""
    below, equal = rank_counts(0.5, [0.1, 0.5, 0.5, 0.9])
    assert (below, equal) == (1, 2)
    b, e, k = (torch.tensor(float(x)) for x in (below, equal, 4))
    f_hat = add_one_cdf(b, k)  # vBoN: (1 + #{r_j < r}) / (M + 1)
    assert float(f_hat) == pytest.approx(0.4) and float(f_hat.log()) == pytest.approx(-0.916290731874155)
    assert float((b + e) / k) == 0.75  # unsmoothed BOND p̂_≤
    p_lt, p_le = add_one_quantiles(b, e, k)  # y counted as a 5th draw in its own tie class: 1/5 below, 4/5 at most
    assert (float(p_lt), float(p_le)) == (pytest.approx(0.2), pytest.approx(0.8))
    # N = 2: (p_≤² − p_<²)/(p_≤ − p_<) = p_≤ + p_< = 1.0 → the bon_ratio reward is log 1 / 1 = 0
    assert float(bon_ratio_reward(b, e, k, 2)) == pytest.approx(0.0, abs=1e-12)
    assert float(log_p_le_reward(b, e, k, 2)) == pytest.approx(math.log(0.8))


def test_estimators_without_ties_and_at_the_extremes():
    # refs (0.1, 0.3, 0.7), r = 0.5: b = 2, e = 0 → p̂_< = 2/4, p̂_≤ = 3/4; N = 3: (27/64 − 8/64)/(1/4) = 19/16
    b, e, k = torch.tensor(2.0), torch.tensor(0.0), torch.tensor(3.0)
    assert float(bon_ratio_reward(b, e, k, 3)) == pytest.approx(math.log(19 / 16) / 2)
    # the worst sample (nothing below or tied) still has p̂_≤ = 1/(k+1) > 0; the best has log p̂_≤ = 0
    worst = log_p_le_reward(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(15.0), 4)
    assert float(worst) == pytest.approx(math.log(1 / 16))
    best = log_p_le_reward(torch.tensor(15.0), torch.tensor(0.0), torch.tensor(15.0), 4)
    assert float(best) == 0.0
    assert float(add_one_cdf(torch.tensor(0.0), torch.tensor(9.0))) == pytest.approx(0.1)


def test_expected_best_of_n_is_unbiased_for_small_cases():
    rewards = [0.0, 0.2, 0.5, 1.0]
    exact = sum(max(c) for c in itertools.combinations(rewards, 2)) / math.comb(4, 2)
    assert expected_best_of_n(rewards, 2) == pytest.approx(exact)
    assert expected_best_of_n([0, 0, 1, 0], 4) == 1.0
    with pytest.raises(ValueError, match="need 1 ≤ n"):
        expected_best_of_n([1.0], 2)


# ------------------------------------------------------------------------- BOND / vBoN: exact expected gradient
def one_token_batch(draw, z, ref_logp, counts):
    """A group of len(draw) one-token completions y_i (position 1), from the 3-outcome policy softmax(z)."""
    B = len(draw)
    logp_all = torch.log_softmax(z, -1)
    logprobs = torch.zeros(B, 2, dtype=torch.float64)
    logprobs = logprobs.index_put((torch.arange(B), torch.ones(B, dtype=torch.long)), logp_all[list(draw)])
    mask = torch.zeros(B, 2, dtype=torch.bool)
    mask[:, 1] = True
    ref = torch.zeros(B, 2, dtype=torch.float64)
    ref[:, 1] = ref_logp[list(draw)]
    below, equal, count = (torch.tensor([float(counts[y][j]) for y in draw]) for j in range(3))
    batch = Batch(input_ids=torch.zeros(B, 2, dtype=torch.long), attention_mask=torch.ones(B, 2, dtype=torch.bool),
                  loss_mask=mask, group_ids=torch.zeros(B, dtype=torch.long),
                  extras={"reward": torch.zeros(B), "old_logprobs": logprobs.detach(), "ref_logprobs": ref,
                          "ref_below": below, "ref_equal": equal, "ref_count": count})
    return logprobs, batch


@pytest.mark.parametrize("name", ["bond", "bond_log_p_le", "vbon"])
def test_expected_gradient_is_that_of_the_kl_to_the_estimated_bon_target(name):
    """E_{y_1, y_2 ~ π_θ}[∇ loss] (exact, all 9 pairs, leave-one-out baseline) = (1/(N−1))·∇ KL(π_θ ‖ π_ref·ŵ) with
    ŵ = exp((N−1)·r̂) the reward's implied BoN ratio: the reward, quantiles and baseline are constants."""
    torch.manual_seed(0)
    N = 4
    z = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.5, -0.4], dtype=torch.float64), -1)
    counts = {0: (0, 3, 8), 1: (3, 4, 8), 2: (7, 0, 8)}  # y's reference counts (below, equal, k): with ties
    if name == "vbon":
        loss_fn = VBoN(VBoN.Options(bon_n=N))
    else:
        quantile = "log_p_le" if name.endswith("log_p_le") else "bon_ratio"
        loss_fn = BOND(BOND.Options(bon_n=N, quantile=quantile))
    grad = torch.zeros(3, dtype=torch.float64)
    probs = torch.softmax(z, -1).detach()
    for draw in itertools.product(range(3), repeat=2):
        logprobs, batch = one_token_batch(draw, z, ref_logp, counts)
        ctx = ctx_for(batch.loss_mask)
        with torch.no_grad():
            prepared = loss_fn.prepare(batch, ctx)
        loss, _ = loss_fn(logprobs, prepared, ctx)
        (g,) = torch.autograd.grad(loss, z)
        grad += probs[draw[0]] * probs[draw[1]] * g
    rewards = loss_fn.quantile_reward(*(torch.tensor([float(counts[y][j]) for y in range(3)]) for j in range(3)))
    log_target = ref_logp + (N - 1) * rewards.double()  # log π_ref·ŵ (unnormalised)
    pi = torch.softmax(z, -1)
    kl = (pi * (pi.log() - log_target)).sum()
    (expected,) = torch.autograd.grad(kl / (N - 1), z)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)  # rewards are float32 in the batch


def test_bond_metrics_report_the_task_reward_and_the_quantile_reward():
    loss_fn = BOND()
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    logprobs, batch = one_token_batch((0, 2), z, torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)),
                                      {0: (0, 1, 4), 2: (4, 0, 4)})
    batch.extras["reward"] = torch.tensor([0.0, 1.0])
    ctx = ctx_for(batch.loss_mask)
    _, metrics = loss_fn(logprobs, loss_fn.prepare(batch, ctx), ctx)
    assert metrics["reward_mean"] == 0.5 and metrics["beta"] == pytest.approx(1 / 3)
    expected = (bon_ratio_reward(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor(4.0), 4)).mean()
    assert metrics["bon_reward_mean"] == pytest.approx(float(expected))


def test_bond_needs_reference_counts_and_valid_options():
    from losses import OptionError

    loss_fn = BOND()
    z = torch.zeros(3, dtype=torch.float64)
    _, batch = one_token_batch((0, 1), z, z, {0: (0, 1, 4), 1: (0, 1, 4)})
    del batch.extras["ref_below"]
    with pytest.raises(ValueError, match=r"needs batch.extras \['ref_below', 'ref_equal', 'ref_count'\].*missing "
                                         r"\['ref_below'\].*reference_rewards"):
        loss_fn.prepare(batch, ctx_for(batch.loss_mask))
    with pytest.raises(OptionError, match="bon_n .* must be an integer ≥ 2"):
        BOND(BOND.Options(bon_n=1))
    with pytest.raises(OptionError, match="quantile must be one of bon_ratio, log_p_le"):
        BOND(BOND.Options(quantile="p_le"))
    with pytest.raises(OptionError, match="needs the KL"):
        VBoN(VBoN.Options(reward_kl="none"))
    assert BOND(BOND.Options(bon_n=5)).opt.reward_beta == 0.25  # β = 1/(N−1)
    assert BOND(BOND.Options(bon_n=5, reward_beta=0.1)).opt.reward_beta == 0.1
    assert {"reference_rewards", "rewards", "ref_logprobs"} <= get_loss_class("bond").needs
    assert BOND().reference_samples == 16 and VBoN().reference_samples == 32 and BOND().reference_ema == 0.0


# ---------------------------------------------------------------------------------------------------- J-BOND
def jbond_batch(logprobs_values, policy_rows, counts, old, ref):
    B, T = logprobs_values.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 1:] = True
    flag = torch.tensor([0.0 if r in policy_rows else 1.0 for r in range(B)])
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.bool),
                 loss_mask=mask, group_ids=torch.tensor([0, 0, 1, 1]),
                 extras={"reward": torch.tensor([0.0, 1.0, 1.0, 1.0]), "reference_sample": flag,
                         "old_logprobs": old, "ref_logprobs": ref,
                         "ref_below": torch.tensor([float(c[0]) for c in counts]),
                         "ref_equal": torch.tensor([float(c[1]) for c in counts]),
                         "ref_count": torch.full((B,), 2.0)})


def test_jbond_loss_value_and_gradients_by_hand():
    """Two prompts, each one policy sample (rows 0, 2) and its best anchor sample (rows 1, 3), 2 loss tokens each.

    Row 0 is worse than both anchor samples (b = e = 0): r_J = −log 16; row 2 ties one (b = 0, e = 1): r_J = 0.
    KL in the reward with 1/(n−1) = 1: R' = r_J − Σ_t (s_old − s_anc); batch-mean baseline over the 2 policy rows.
    ℓ = (1−β)·mean_anchor(−Σ_t s_t) + β·mean_policy(−Σ_t Â s_t), β = 0.5.
    """
    s = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5], [0.0, -0.2, -0.3], [0.0, -1.5, -0.5]],
                     dtype=torch.float64, requires_grad=True)
    old = s.detach().clone()
    ref = old.clone()
    ref[0, 1:] = torch.tensor([-1.5, -2.0])  # Σ(old − ref) = 0.5 for row 0
    ref[2, 1:] = torch.tensor([-0.2, -0.1])  # Σ(old − ref) = −0.2 for row 2
    counts = [(0, 0), (1, 1), (0, 1), (0, 2)]
    batch = jbond_batch(s.detach(), [0, 2], counts, old, ref)
    loss_fn = JBOND()
    ctx = ctx_for(batch.loss_mask)
    prepared = loss_fn.prepare(batch, ctx)
    r = torch.tensor([-math.log(16) - 0.5, 0.0 + 0.2])  # R' of rows 0, 2
    adv = r - r.mean()
    torch.testing.assert_close(prepared.extras["jbond_reward"], torch.tensor([-math.log(16), 0.0, 0.0, 0.0]))
    torch.testing.assert_close(prepared.extras["advantages"][[0, 2], 1], adv.float())
    assert float(prepared.extras["advantages"][[1, 3]].abs().sum()) == 0.0
    loss, metrics = loss_fn(s, prepared, ctx)
    nll_anchor = (1.0 + 2.0) / 2  # rows 1 and 3: Σ_t −s_t = 1.0 and 2.0
    pg = -(adv[0] * (-3.0) + adv[1] * (-0.5)) / 2
    assert float(loss.detach()) == pytest.approx(0.5 * nll_anchor + 0.5 * float(pg))
    (g,) = torch.autograd.grad(loss, s)
    expected = torch.zeros_like(s)
    expected[[1, 3], 1:] = -0.5 / 2  # −(1−β)/P on the anchor tokens
    expected[0, 1:], expected[2, 1:] = -0.5 * adv[0] / 2, -0.5 * adv[1] / 2  # −β·Â/P: reward, KL, baseline constant
    torch.testing.assert_close(g, expected)
    assert metrics["worse_frac"] == pytest.approx(0.5) and metrics["reward_mean"] == pytest.approx(0.5)
    assert metrics["nll_forward"] == pytest.approx((0.5 + 1.0) / 2)  # per-token NLL of the anchor rows


def test_jbond_options_and_missing_anchor_rows():
    from losses import OptionError

    assert JBOND().reference_ema == 0.02 and JBOND().reference_samples == 2
    assert JBOND().opt.worse_reward == pytest.approx(-math.log(16))
    with pytest.raises(OptionError, match="reference_ema .* must lie in \\(0, 1\\]"):
        JBOND(JBOND.Options(reference_ema=0.0))
    with pytest.raises(OptionError, match="jeffreys_beta must lie in \\[0, 1\\]"):
        JBOND(JBOND.Options(jeffreys_beta=1.5))
    s = torch.zeros(4, 3, dtype=torch.float64)
    batch = jbond_batch(s, [0, 2], [(0, 0)] * 4, s, s)
    del batch.extras["reference_sample"]
    with pytest.raises(ValueError, match="reference_sample.*reference_best"):
        JBOND().prepare(batch, ctx_for(batch.loss_mask))
