"""SFT and DFT against LOSSES.md §1/§3 and shared/spec/testvectors.py, and the shared reductions (§0.1)."""

import math

import pytest
import torch
from helpers import ctx_for
from torch.testing import assert_close

import losses
from losses import Batch, LossContext, aggregate


def one_token_batch(logp: float):
    """A batch with one trained token (position 1) whose log-prob is `logp`."""
    lp = torch.tensor([[0.0, logp]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True]])
    batch = Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.bool),
                  loss_mask=mask)
    return lp, batch


def test_dft_test_vector():
    """testvectors.py: p = 0.3 → per-token DFT loss −0.3·ln 0.3 = 0.361192, d/ds = −p = −0.3."""
    lp, batch = one_token_batch(math.log(0.3))
    loss, metrics = losses.get_loss_class("dft")()(lp, batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx(0.3611918412977808, abs=1e-9)
    loss.backward()
    assert lp.grad[0, 1].item() == pytest.approx(-0.3, abs=1e-12)
    assert metrics["nll"] == pytest.approx(-math.log(0.3))


def test_sft_value_and_gradient():
    """ℓ = −s, so the loss is −ln 0.3 and d/ds = −1."""
    lp, batch = one_token_batch(math.log(0.3))
    loss, _ = losses.get_loss_class("sft")()(lp, batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx(-math.log(0.3))
    loss.backward()
    assert lp.grad[0, 1].item() == pytest.approx(-1.0)


def test_dft_gradient_matches_finite_difference_of_minus_p():
    """DFT has the gradient of −Σ p_t (LOSSES.md §3); check by central differences on random log-probs."""
    torch.manual_seed(0)
    s = (torch.rand(3, 5, dtype=torch.float64) * -3).requires_grad_()
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = False
    batch = Batch(torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.bool), mask)
    ctx = ctx_for(mask)
    loss, _ = losses.get_loss_class("dft")()(s, batch, ctx)
    loss.backward()
    eps = 1e-6
    for i in range(3):
        for t in range(5):
            plus, minus = s.detach().clone(), s.detach().clone()
            plus[i, t] += eps
            minus[i, t] -= eps
            f = lambda x: -(x.exp() * mask).sum() / ctx.num_tokens  # the surrogate with the same gradient
            fd = (f(plus) - f(minus)) / (2 * eps)
            assert s.grad[i, t].item() == pytest.approx(fd.item(), abs=1e-8)


def test_reduction_modes_by_hand():
    """Per-token ℓ = [[1,2,0],[3,0,0]] with masks [[1,1,0],[1,0,0]] (B=2, T_max=3)."""
    per = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    ctx = ctx_for(mask, max_length=3)
    assert aggregate(per, mask, "token_mean", ctx).item() == pytest.approx(6 / 3)  # A1
    assert aggregate(per, mask, "seq_mean_token_mean", ctx).item() == pytest.approx((1.5 + 3) / 2)  # A3
    assert aggregate(per, mask, "seq_mean_token_sum", ctx).item() == pytest.approx((3 + 3) / 2)  # A4
    assert aggregate(per, mask, "token_sum_norm", ctx).item() == pytest.approx(6 / (2 * 3))  # A5
    assert aggregate(per, mask, "micro_token_mean", ctx).item() == pytest.approx(2.0)  # A2, one micro-batch
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per, mask, "mean", ctx)


def test_masked_nan_does_not_leak():
    per = torch.tensor([[1.0, float("nan")]])
    mask = torch.tensor([[True, False]])
    assert aggregate(per, mask, "token_mean", ctx_for(mask)).item() == 1.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"])
@pytest.mark.parametrize("name", ["sft", "dft"])
def test_one_micro_batch_of_8_equals_8_micro_batches_of_1(mode, name):
    """Split-independent modes: summing each micro-batch's share gives the same loss and gradient."""
    torch.manual_seed(1)
    B, T = 8, 7
    s = (torch.rand(B, T, dtype=torch.float64) * -4).requires_grad_()
    mask = torch.rand(B, T) > 0.4
    mask[:, 0] = False
    mask[:, 1] = True
    batch = Batch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), mask)
    loss_fn = losses.get_loss_class(name)(losses.get_loss_class(name).Options(aggregation=mode))
    full_ctx = LossContext(num_tokens=float(mask.sum()), num_sequences=B, num_micro_batches=1, max_length=T)
    full, _ = loss_fn(s, batch, full_ctx)
    g_full = torch.autograd.grad(full, s)[0]
    split_ctx = LossContext(num_tokens=float(mask.sum()), num_sequences=B, num_micro_batches=B, max_length=T)
    total = 0
    for i in range(B):
        part, _ = loss_fn(s[i : i + 1], batch.select([i], crop=False), split_ctx)
        total = total + part
    g_split = torch.autograd.grad(total, s)[0]
    assert_close(total, full, rtol=0, atol=1e-12)
    assert_close(g_split, g_full, rtol=0, atol=1e-12)


def test_micro_token_mean_depends_on_the_split():
    """A2 is offered to match verl/DFT/ASFT, and is documented as split-dependent: show it."""
    per = torch.tensor([[0.0, 1.0, 1.0], [0.0, 4.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    one = aggregate(per, mask, "micro_token_mean", LossContext(3, 2, 1, 3))
    two = sum(aggregate(per[i : i + 1], mask[i : i + 1], "micro_token_mean", LossContext(3, 2, 2, 3)) for i in range(2))
    assert one.item() == pytest.approx(2.0) and two.item() == pytest.approx((1.0 + 4.0) / 2)


def test_empty_mask_gives_connected_zero():
    s = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask)
    loss, _ = losses.get_loss_class("sft")()(s, batch, LossContext(0, 2, 1, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(2, 3))


def test_bad_aggregation_option_rejected():
    cls = losses.get_loss_class("sft")
    with pytest.raises(losses.OptionError, match="aggregation must be one of"):
        cls(cls.Options(aggregation="mean"))


def test_registry_import_path_and_errors():
    assert losses.get_loss_class("losses.sft:DFT") is losses.get_loss_class("dft")
    with pytest.raises(ValueError, match="did you mean 'sft'"):
        losses.get_loss_class("stf")
    with pytest.raises(ValueError, match="cannot import module"):
        losses.get_loss_class("no_such_pkg.mod:Loss")
    with pytest.raises(ValueError, match="not a subclass"):
        losses.get_loss_class("losses.batch:Batch")
