"""The DPO family (dpo variants, dpo_ref_free, simpo) against LOSSES.md §2 and shared/spec/testvectors.out.

Spec point (testvectors.py): log π_θ(y_w) = −10, log π_θ(y_l) = −12, log π_ref(y_w) = −11, log π_ref(y_l) = −11.5
(h = 1.5), β = 0.1, |y_w| = 5, |y_l| = 8. The per-token log-probs below are hand-built so their masked sums are those
numbers; the loss must equal the spec value, and autograd's gradient with respect to every trained token must equal the
central finite difference of the spec formula with respect to that sequence's log-prob (each token of a sequence gets
d loss / d log π(y) because log π(y) = Σ_t s_t).
"""

import math

import pytest
import torch
from helpers import ctx_for
from torch.testing import assert_close

import losses
from align.config import LossConfig, build_loss
from align.configio import ConfigError
from losses import Batch

PC, PR, RC, RR, BETA, LC, LR = -10.0, -12.0, -11.0, -11.5, 0.1, 5, 8


def sp(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


# the spec formulas of testvectors.py, as functions of (pc, pr, rc, rr)
def h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


SPEC = {
    # name: (loss name, options, value from testvectors.out, formula)
    "sigmoid": ("dpo", {}, 0.6209570477895321, lambda *a: sp(-BETA * h(*a))),
    "cdpo": ("dpo", {"variant": "cdpo", "label_smoothing": 0.1}, 0.6359570477895321,
             lambda *a: 0.9 * sp(-BETA * h(*a)) + 0.1 * sp(BETA * h(*a))),
    "robust": ("dpo", {"variant": "robust", "label_smoothing": 0.1}, 0.602207047789532,
               lambda *a: (0.9 * sp(-BETA * h(*a)) - 0.1 * sp(BETA * h(*a))) / 0.8),
    "ipo_sum": ("dpo", {"variant": "ipo_sum"}, 12.25, lambda *a: (h(*a) - 1 / (2 * BETA)) ** 2),
    "ipo_mean": ("dpo", {"variant": "ipo_mean"}, 22.443906249999998,
                 lambda pc, pr, rc, rr: ((pc - rc) / LC - (pr - rr) / LR - 1 / (2 * BETA)) ** 2),
    "ref_free": ("dpo_ref_free", {}, 0.5981388693815918, lambda pc, pr, rc, rr: sp(-BETA * (pc - pr))),
    "simpo": ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, 2.1269280110429727,
              lambda pc, pr, rc, rr: sp(-2.0 * (pc / LC - pr / LR - 0.5))),
}


def spread(total: float, n: int, seed: int) -> list[float]:
    """n unequal negative numbers summing to `total`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return (w / w.sum() * total).tolist()


def spec_batch(dtype=torch.float64):
    """Rows [chosen (5 loss tokens), rejected (8)], T = 10 (position 0 and the padding carry no loss)."""
    T = 10
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 1:1 + LC] = True
    mask[1, 1:1 + LR] = True
    lp = torch.zeros(2, T, dtype=dtype)
    ref = torch.zeros(2, T, dtype=dtype)
    lp[0, mask[0]] = torch.tensor(spread(PC, LC, 0), dtype=dtype)
    lp[1, mask[1]] = torch.tensor(spread(PR, LR, 1), dtype=dtype)
    ref[0, mask[0]] = torch.tensor(spread(RC, LC, 2), dtype=dtype)
    ref[1, mask[1]] = torch.tensor(spread(RR, LR, 3), dtype=dtype)
    lp[~mask] = -7.0  # values off the mask must not matter
    ref[~mask] = -3.0
    att = torch.ones(2, T, dtype=torch.bool)
    batch = Batch(torch.zeros(2, T, dtype=torch.long), att, mask, extras={"ref_logprobs": ref,
                                                                         "index": torch.tensor([7, 7])})
    return lp.requires_grad_(), batch


def fd(f, args, i, eps=1e-6):
    plus, minus = list(args), list(args)
    plus[i] += eps
    minus[i] -= eps
    return (f(*plus) - f(*minus)) / (2 * eps)


@pytest.mark.parametrize("case", list(SPEC))
def test_variant_matches_spec_value_and_gradient(case):
    name, options, expected, formula = SPEC[case]
    lp, batch = spec_batch()
    assert formula(PC, PR, RC, RR) == pytest.approx(expected, abs=1e-12)  # the formula here is the spec's
    loss_fn = losses.get_loss_class(name)(losses.get_loss_class(name).Options(**options))
    loss, metrics = loss_fn(lp, batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    loss.backward()
    args = (PC, PR, RC, RR)
    d_chosen, d_rejected = fd(formula, args, 0), fd(formula, args, 1)
    mask = batch.loss_mask
    assert_close(lp.grad[0, mask[0]], torch.full((LC,), d_chosen, dtype=torch.float64), atol=1e-8, rtol=1e-6)
    assert_close(lp.grad[1, mask[1]], torch.full((LR,), d_rejected, dtype=torch.float64), atol=1e-8, rtol=1e-6)
    assert torch.all(lp.grad[~mask] == 0)
    assert 0.0 <= metrics["rewards/accuracy"] <= 1.0


def test_gradient_is_nonzero_and_signed_the_right_way():
    """Minimising DPO raises the chosen log-prob and lowers the rejected one: d/ds_w < 0 < d/ds_l."""
    lp, batch = spec_batch()
    loss, _ = losses.get_loss_class("dpo")()(lp, batch, ctx_for(batch.loss_mask))
    loss.backward()
    assert (lp.grad[0, batch.loss_mask[0]] < 0).all() and (lp.grad[1, batch.loss_mask[1]] > 0).all()


def test_dpo_metrics_are_the_implicit_rewards():
    """r_w = β(−10 + 11) = 0.1, r_l = β(−12 + 11.5) = −0.05, margin 0.15, accuracy 1."""
    lp, batch = spec_batch()
    _, m = losses.get_loss_class("dpo")()(lp, batch, ctx_for(batch.loss_mask))
    assert m["rewards/chosen"] == pytest.approx(0.1)
    assert m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/margins"] == pytest.approx(0.15)
    assert m["rewards/accuracy"] == 1.0
    assert m["logps/chosen"] == pytest.approx(PC) and m["logps/rejected"] == pytest.approx(PR)
    _, m = losses.get_loss_class("simpo")(losses.get_loss_class("simpo").Options(beta=2.0))(
        lp, batch, ctx_for(batch.loss_mask))
    assert m["rewards/chosen"] == pytest.approx(2.0 * PC / LC) and m["rewards/rejected"] == pytest.approx(2.0 * PR / LR)


def test_reference_gets_no_gradient():
    lp, batch = spec_batch()
    batch.extras["ref_logprobs"].requires_grad_()
    loss, _ = losses.get_loss_class("dpo")()(lp, batch, ctx_for(batch.loss_mask))
    loss.backward()
    assert batch.extras["ref_logprobs"].grad is None


def test_simpo_sft_term():
    """sft_weight λ adds λ·(−log π(y_w)/|y_w|) per pair: here λ·10/5 = 2λ, gradient −λ/|y_w| per chosen token."""
    lp, batch = spec_batch()
    cls = losses.get_loss_class("simpo")
    base, _ = cls(cls.Options(beta=2.0, gamma_beta_ratio=0.5))(lp, batch, ctx_for(batch.loss_mask))
    with_sft, m = cls(cls.Options(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3))(lp, batch, ctx_for(batch.loss_mask))
    assert (with_sft - base).item() == pytest.approx(0.3 * 2.0)
    assert m["sft_nll"] == pytest.approx(2.0)
    g_base = torch.autograd.grad(base, lp)[0]
    lp2, batch2 = spec_batch()
    with_sft2, _ = cls(cls.Options(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3))(lp2, batch2, ctx_for(batch2.loss_mask))
    g = torch.autograd.grad(with_sft2, lp2)[0]
    assert_close((g - g_base)[0, batch.loss_mask[0]], torch.full((LC,), -0.3 / LC, dtype=torch.float64))
    assert torch.all((g - g_base)[1] == 0)


def random_pairs(n_pairs=4, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = 2 * n_pairs
    lengths = torch.randint(2, T, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, 0] = False
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    batch = Batch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), mask,
                  extras={"ref_logprobs": ref, "index": torch.arange(B) // 2})
    return lp, batch


@pytest.mark.parametrize("name, options", [("dpo", {}), ("dpo", {"variant": "ipo_mean"}),
                                           ("dpo", {"variant": "robust", "label_smoothing": 0.2}),
                                           ("simpo", {"sft_weight": 0.5})])
def test_micro_batching_is_the_mean_over_pairs(name, options):
    """One micro-batch of 4 pairs and 4 micro-batches of 1 pair give the same loss and gradient (mean over pairs)."""
    cls = losses.get_loss_class(name)
    fn = cls(cls.Options(**options))
    lp, batch = random_pairs()
    lp.requires_grad_()
    ctx = ctx_for(batch.loss_mask)
    whole, _ = fn(lp, batch, ctx)
    g_whole = torch.autograd.grad(whole, lp)[0]
    lp2 = lp.detach().clone().requires_grad_()
    total = 0
    for i in range(4):
        rows = [2 * i, 2 * i + 1]
        mb = batch.select(rows, crop=False)
        part, _ = fn(lp2[rows], mb, ctx)  # ctx: counts of the whole optimizer batch
        total = total + part
    g_parts = torch.autograd.grad(total, lp2)[0]
    assert_close(total, whole)
    assert_close(g_parts, g_whole)


def test_loss_is_mean_of_per_pair_losses():
    lp, batch = random_pairs()
    loss, _ = losses.get_loss_class("dpo")()(lp, batch, ctx_for(batch.loss_mask))
    m = batch.loss_mask
    per = []
    for i in range(4):
        hh = ((lp[2 * i] - batch.extras["ref_logprobs"][2 * i]) * m[2 * i]).sum() - \
             ((lp[2 * i + 1] - batch.extras["ref_logprobs"][2 * i + 1]) * m[2 * i + 1]).sum()
        per.append(sp(-BETA * hh.item()))
    assert loss.item() == pytest.approx(sum(per) / 4)


def test_extreme_margins_stay_finite():
    """softplus, not log(sigmoid): |βh| in the thousands gives a finite loss and gradient."""
    lp, batch = random_pairs()
    lp = lp.detach() * 0
    lp[0::2] = -5000.0
    lp.requires_grad_()
    for name, opts in [("dpo", {}), ("dpo", {"variant": "cdpo", "label_smoothing": 0.1}),
                       ("dpo", {"variant": "robust", "label_smoothing": 0.1}), ("simpo", {})]:
        cls = losses.get_loss_class(name)
        loss, _ = cls(cls.Options(**opts))(lp, batch, ctx_for(batch.loss_mask))
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name


def test_empty_side_of_a_pair_is_an_error_not_nan():
    lp, batch = random_pairs()
    batch.loss_mask[3] = False  # the rejected side of pair 1 lost all its loss tokens
    batch.extras["index"] = torch.tensor([10, 10, 11, 11, 12, 12, 13, 13])
    for name in ("dpo", "simpo", "dpo_ref_free"):
        with pytest.raises(ValueError, match="rejected of dataset row 11 has no loss tokens"):
            losses.get_loss_class(name)()(lp, batch, ctx_for(batch.loss_mask))


def test_odd_rows_and_missing_reference_are_errors():
    lp, batch = random_pairs()
    with pytest.raises(ValueError, match="even number of rows"):
        losses.get_loss_class("dpo")()(lp[:3], batch.select([0, 1, 2], crop=False), ctx_for(batch.loss_mask))
    del batch.extras["ref_logprobs"]
    with pytest.raises(ValueError, match=r"needs batch.extras\['ref_logprobs'\]"):
        losses.get_loss_class("dpo")()(lp, batch, ctx_for(batch.loss_mask))
    loss, _ = losses.get_loss_class("dpo_ref_free")()(lp, batch, ctx_for(batch.loss_mask))  # needs no reference
    assert torch.isfinite(loss)


def test_needs():
    assert losses.get_loss_class("dpo").needs == {"pairs", "ref_logprobs"}
    assert losses.get_loss_class("dpo_ref_free").needs == {"pairs"}
    assert losses.get_loss_class("simpo").needs == {"pairs"}


@pytest.mark.parametrize("name, options, match", [
    ("dpo", {"beta": 0.0}, "beta must be a positive number, got 0.0"),
    ("dpo", {"beta": -1}, "beta must be a positive number"),
    ("dpo", {"variant": "ipo"}, "variant 'ipo' is ambiguous: choose 'ipo_mean'"),
    ("dpo", {"variant": "hinge"}, "unknown variant 'hinge'; choose one of sigmoid, cdpo, robust, ipo_sum, ipo_mean"),
    ("dpo", {"variant": "robust", "label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
    ("dpo", {"variant": "cdpo", "label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 0.5\)"),
    ("dpo", {"label_smoothing": 0.1}, "has no effect on variant 'sigmoid'; it is used by cdpo and robust only"),
    ("dpo", {"variant": "ipo_mean", "label_smoothing": 0.1}, "has no effect on variant 'ipo_mean'"),
    ("dpo", {"betta": 0.1}, "unknown option 'loss.betta' for loss 'dpo'; did you mean 'beta'"),
    ("simpo", {"gamma_beta_ratio": -1}, "gamma_beta_ratio must be ≥ 0"),
    ("simpo", {"sft_weight": -0.1}, "sft_weight must be ≥ 0"),
    ("simpo", {"gamma": 1.0}, "unknown option 'loss.gamma' for loss 'simpo'; valid keys: beta, gamma_beta_ratio"),
])
def test_bad_options_name_the_problem(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_loss(LossConfig(name=name, options=options))
