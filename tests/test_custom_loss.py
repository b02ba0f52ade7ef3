"""The researcher's path: a loss defined outside the library (examples/custom_loss/dco.py), loaded by path."""

import math
import os

import mpmath
import pytest
import torch
from helpers import ctx_for, tiny_config

import losses
from align.config import pipeline_from_dict
from align.trainer import Trainer
from losses import Batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(REPO, "examples", "custom_loss", "dco.py") + ":DCO"


def dco_cls():
    return losses.get_loss_class(SPEC)


def exact(L: float, n: int):
    """−log(1 − (1 − e^L)^n) and its derivative in L, in arbitrary precision."""
    mpmath.mp.dps = max(60, int(-L / 2.3) + 40)  # enough digits that 1 − e^L is not rounded to 1
    L = mpmath.mpf(L)
    f = lambda x: -mpmath.log(1 - (1 - mpmath.e ** x) ** n)
    return float(f(L)), float(mpmath.diff(f, L))


def seq_batch(seq_logps):
    """One trained token per row carrying the whole sequence log-prob (the loss only sees Σ_t m_t s_t)."""
    B = len(seq_logps)
    lp = torch.zeros(B, 2, dtype=torch.float64)
    lp[:, 1] = torch.tensor(seq_logps, dtype=torch.float64)
    lp.requires_grad_()
    mask = torch.tensor([[False, True]] * B)
    return lp, Batch(torch.zeros(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.bool), mask)


@pytest.mark.parametrize("L", [-1e-9, -0.01, -0.7, -3.0, -19.9, -20.1, -35.0, -200.0, -5000.0])
@pytest.mark.parametrize("n", [1, 4, 64])
def test_value_and_gradient_match_high_precision(L, n):
    lp, batch = seq_batch([L])
    loss, _ = dco_cls()(dco_cls().Options(n=n))(lp, batch, ctx_for(batch.loss_mask))
    loss.backward()
    want, dwant = exact(L, n)
    assert math.isfinite(loss.item()) and math.isfinite(lp.grad[0, 1].item())
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert lp.grad[0, 1].item() == pytest.approx(dwant, rel=1e-6, abs=1e-12)


def test_n_equals_1_is_sequence_level_nll_and_mean_over_examples():
    lp, batch = seq_batch([-2.0, -5.0])
    loss, m = dco_cls()(dco_cls().Options(n=1))(lp, batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx((2.0 + 5.0) / 2)
    assert m["coverage"] == pytest.approx((math.exp(-2) + math.exp(-5)) / 2)


def test_bad_option_is_rejected():
    with pytest.raises(losses.OptionError, match="n must be a positive integer"):
        dco_cls()(dco_cls().Options(n=0))


def test_trains_from_a_config_by_file_path(tmp_path):
    cfg = tiny_config(tmp_path, loss={"name": SPEC, "n": 4},
                      train={"steps": 12, "lr": 3e-3, "batch_size": 16, "micro_batch_size": 8})
    pipe = pipeline_from_dict(cfg)
    t = Trainer(pipe.stages[0].config, pipe.run_dir)
    t.fit()
    import json

    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    cov = [r["coverage"] for r in rows if r["kind"] == "train"]
    assert len(cov) == 12 and cov[-1] > cov[0]


def test_unknown_option_of_a_user_loss_names_it(tmp_path):
    from align.configio import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'loss.N' for loss .*; did you mean 'n'"):
        pipeline_from_dict(tiny_config(tmp_path, loss={"name": SPEC, "N": 4}))
