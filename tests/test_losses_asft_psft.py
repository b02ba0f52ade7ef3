"""ASFT / SFT+KL (LOSSES.md §4) and PSFT (§5): test vectors, gradients against unchunked autograd, stop-gradients,
option checks, and short runs through the real trainer on the tiny model."""

import copy
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ctx_for, tiny_config
from torch.testing import assert_close

import losses
from align.collate import collate
from align.config import ConfigError, DataConfig, LossConfig, build_loss, pipeline_from_dict
from align.data import Tokenizer
from align.head import decoder_hidden, ref_kl, token_logprobs
from align.trainer import Trainer
from losses import Batch, LossContext, OptionError

# ---------------------------------------------------------------------------------------------------- helpers


def one_token(logp: float, old: float = 0.0):
    lp = torch.tensor([[0.0, logp]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True]])
    batch = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), mask,
                  extras={"old_logprobs": torch.tensor([[0.0, old]], dtype=torch.float64)})
    return lp, batch


def arith_examples(tokenizer, n=6):
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    rows = [({"role": "user", "content": f"What is {i}+{3 * i}?"}, {"role": "assistant", "content": str(4 * i) * (1 + i % 3)})
            for i in range(n)]
    return [tk.example({"prompt": [p], "completion": [c]}, i, "prompt_completion") for i, (p, c) in enumerate(rows)]


def perturbed(model, scale=0.05, seed=0):
    """A copy of `model` with noise on every weight (so π_θ ≠ π_ref)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def full_ctx(batch, **kw):
    return LossContext(num_tokens=float(batch.loss_mask.sum()), num_sequences=len(batch), num_micro_batches=1,
                       max_length=batch.seq_len, **kw)


def trainer_for(cfg_dict):
    pipe = pipeline_from_dict(cfg_dict)
    return Trainer(pipe.stages[0].config, pipe.run_dir)


def train_rows(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------------- PSFT values


@pytest.mark.parametrize("rho, loss_value, grad", [(0.7, -0.7, -0.7), (1.0, -1.0, -1.0), (1.1, -1.1, -1.1),
                                                   (1.4, -1.28, 0.0)])
def test_psft_test_vectors(rho, loss_value, grad):
    """testvectors.py (ε_low 0.2, ε_high 0.28, s_old = 0): ℓ = −min(ρ, clip(ρ, 0.8, 1.28)), d ℓ/d s = −ρ·1[ρ<1.28]."""
    lp, batch = one_token(math.log(rho))
    loss, metrics = losses.get_loss_class("psft")()(lp, batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx(loss_value, abs=1e-12)
    loss.backward()
    assert lp.grad[0, 1].item() == pytest.approx(grad, abs=1e-12)
    assert metrics["ratio"] == pytest.approx(rho)
    assert metrics["clip_frac"] == (1.0 if rho > 1.28 else 0.0)


def test_psft_gradient_is_ratio_weighted_sft_with_high_ratios_cut():
    """Random ratios in [0.3, 2]: d ℓ/d s_t = −ρ_t·1[ρ_t < 1+ε_high] / N_tok (A1); tokens above 1.28 get exactly 0."""
    torch.manual_seed(0)
    B, T = 4, 9
    s = (torch.rand(B, T, dtype=torch.float64) * -3).requires_grad_()
    rho = torch.rand(B, T, dtype=torch.float64) * 1.7 + 0.3
    mask = torch.rand(B, T) > 0.2
    mask[:, 0] = False
    old = (s.detach() - rho.log())
    batch = Batch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), mask,
                  extras={"old_logprobs": old})
    ctx = ctx_for(mask)
    loss, _ = losses.get_loss_class("psft")()(s, batch, ctx)
    loss.backward()
    want = torch.where(mask & (rho < 1.28), -rho, torch.zeros_like(rho)) / ctx.num_tokens
    assert_close(s.grad, want, rtol=1e-12, atol=1e-15)
    above = mask & (rho > 1.28)
    assert above.sum() > 3 and (s.grad[above] == 0).all()
    # value: −Σ min(ρ, 1.28) / N
    assert loss.item() == pytest.approx(float(-(torch.minimum(rho, torch.tensor(1.28, dtype=torch.float64))
                                                 * mask).sum() / ctx.num_tokens))


def test_psft_log_ratio_is_clamped_like_verl():
    """|log ρ| > 20 is clamped before exp (verl): a huge log-ratio gives the clipped value and no inf/NaN."""
    lp = torch.tensor([[0.0, 50.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), mask,
                  extras={"old_logprobs": torch.zeros(1, 3)})
    loss, metrics = losses.get_loss_class("psft")()(lp, batch, ctx_for(mask))
    assert loss.item() == pytest.approx((-1.28 - math.exp(-20.0)) / 2)
    assert metrics["ratio"] == pytest.approx((math.exp(20.0) + math.exp(-20.0)) / 2, rel=1e-6)
    assert metrics["clip_frac"] == 0.5
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0 and lp.grad[0, 2] == 0  # clamp: no gradient outside


@pytest.mark.parametrize("name", ["psft", "asft"])
def test_split_invariance(name):
    """A1: one micro-batch of 8 rows = 8 micro-batches of 1 (loss and gradient); ASFT with a stand-in ref_kl."""
    torch.manual_seed(1)
    B, T = 8, 7
    s = (torch.rand(B, T, dtype=torch.float64) * -4).requires_grad_()
    kl_src = torch.rand(B, T, dtype=torch.float64).requires_grad_()  # stands in for ctx.ref_kl()'s (B, T) output
    mask = torch.rand(B, T) > 0.4
    mask[:, 0], mask[:, 1] = False, True
    batch = Batch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), mask,
                  extras={"old_logprobs": s.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)})
    fn = losses.get_loss_class(name)()
    n_tok = float(mask.sum())
    full, _ = fn(s, batch, LossContext(n_tok, B, 1, T, ref_kl_fn=lambda: kl_src))
    wrt = [s, kl_src] if name == "asft" else [s]
    g_full = torch.autograd.grad(full, wrt)
    total = 0
    for i in range(B):
        ctx = LossContext(n_tok, B, B, T, ref_kl_fn=lambda i=i: kl_src[i : i + 1])
        total = total + fn(s[i : i + 1], batch.select([i], crop=False), ctx)[0]
    g_split = torch.autograd.grad(total, wrt)
    assert_close(total, full, rtol=0, atol=1e-12)
    for a, b in zip(g_split, g_full):
        assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("name, options, message", [
    ("asft", {"kl_weight": -0.1}, "kl_weight (λ) must be a finite number >= 0"),
    ("sft_kl", {"kl_weight": -1.0}, "kl_weight (λ) must be a finite number >= 0"),
    ("asft", {"kl_weight": float("inf")}, "kl_weight (λ) must be a finite number >= 0"),
    ("psft", {"eps_low": 0.0}, "eps_low must lie strictly between 0 and 1"),
    ("psft", {"eps_low": -0.2}, "eps_low must lie strictly between 0 and 1"),
    ("psft", {"eps_high": 1.0}, "eps_high must lie strictly between 0 and 1"),
    ("psft", {"eps_high": 1.5}, "eps_high must lie strictly between 0 and 1"),
    ("psft", {"minibatches": 0}, "minibatches must be a whole number >= 1"),
    ("psft", {"epochs": 0}, "epochs must be a whole number >= 1"),
])
def test_bad_options_are_rejected(name, options, message):
    cls = losses.get_loss_class(name)
    with pytest.raises(OptionError, match=re.escape(message)):
        cls(cls.Options(**options))
    # through the config: the error names the section and the loss, before any model is loaded
    with pytest.raises(ConfigError, match=re.escape(f"loss ({name}): {message}")):
        build_loss(LossConfig(name=name, options=options))


def test_options_reach_the_trainer_protocol():
    loss = build_loss(LossConfig(name="psft", options={"minibatches": 3, "epochs": 2}))
    assert (loss.minibatches, loss.epochs, loss.needs) == (3, 2, frozenset({"old_logprobs"}))
    assert losses.get_loss_class("psft")().minibatches == 8  # LOSSES.md §5: 8 steps per snapshot
    asft = build_loss(LossConfig(name="asft"))
    assert asft.opt.kl_weight == 0.1 and asft.needs == frozenset({"ref_model"}) and asft.aggregation == "token_mean"
    assert build_loss(LossConfig(name="sft_kl", options={"aggregation": "micro_token_mean"})).aggregation == \
        "micro_token_mean"


# ---------------------------------------------------------------------------------------------------- ASFT on the model


def _asft_setup(tiny_model, tokenizer):
    policy = perturbed(tiny_model)
    ref = tiny_model  # parameters left requires_grad=True on purpose: they must still get no gradient
    batch, _ = collate(arith_examples(tokenizer), tokenizer.pad_token_id)
    return policy, ref, batch


def _align_loss(name, options, policy, ref, batch, chunk=5):
    hidden = decoder_hidden(policy, batch.input_ids, batch.attention_mask)
    lp, _ = token_logprobs(policy, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=chunk)
    with torch.no_grad():
        ref_hidden = decoder_hidden(ref, batch.input_ids, batch.attention_mask)
    ctx = full_ctx(batch, ref_kl_fn=lambda: ref_kl(policy, hidden, ref, ref_hidden, batch.loss_mask, chunk_tokens=chunk))
    cls = losses.get_loss_class(name)
    return cls(cls.Options(**options))(lp, batch, ctx)


def _unchunked_reference(name, kl_weight, policy, ref, batch):
    """Eq. of LOSSES.md §4 on full (B, T, V) logits, as the ASFT repository computes it (A1 over the batch)."""
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float()[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float()[:, :-1]
    targets = batch.input_ids[:, 1:]
    s = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T−1)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(ref_logits, -1), reduction="none").sum(-1)  # (B, T−1)
    fit = -s.detach().exp() * s if name == "asft" else -s
    mask = batch.loss_mask[:, 1:]
    return ((fit + kl_weight * kl) * mask).sum() / mask.sum(), (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", ["asft", "sft_kl"])
def test_asft_equals_unchunked_kl_div_reference(tiny_model, tokenizer, name):
    """Chunked loss (chunk 5 rows) = F.kl_div on full logits: value and every parameter gradient to 1e-5; the frozen
    reference gets no gradient even with requires_grad=True on its parameters."""
    policy, ref, batch = _asft_setup(tiny_model, tokenizer)
    want, want_kl = _unchunked_reference(name, 0.3, policy, ref, batch)
    g_want = torch.autograd.grad(want, list(policy.parameters()))
    got, metrics = _align_loss(name, {"kl_weight": 0.3}, policy, ref, batch)
    assert_close(got.detach(), want.detach(), atol=1e-5, rtol=0)
    assert metrics["ref_kl"] == pytest.approx(want_kl.item(), abs=1e-5) and want_kl.item() > 1e-3
    got.backward()
    for (n, p), g in zip(policy.named_parameters(), g_want):
        assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert all(p.grad is None for p in ref.parameters())


def test_asft_with_zero_weight_is_exactly_dft(tiny_model, tokenizer):
    """λ = 0: the same loss and the same parameter gradients as `dft`, bit for bit (the KL is still logged)."""
    policy, ref, batch = _asft_setup(tiny_model, tokenizer)
    got, metrics = _align_loss("asft", {"kl_weight": 0.0}, policy, ref, batch)
    got.backward()
    g_asft = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    hidden = decoder_hidden(policy, batch.input_ids, batch.attention_mask)
    lp, _ = token_logprobs(policy, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=5)
    dft, _ = losses.get_loss_class("dft")()(lp, batch, full_ctx(batch))
    dft.backward()
    assert torch.equal(got.detach(), dft.detach())
    for a, p in zip(g_asft, policy.parameters()):
        assert torch.equal(a, p.grad)
    assert metrics["ref_kl"] > 1e-3


def test_asft_kl_is_zero_when_policy_is_the_reference(tiny_model, tokenizer):
    """At the start of training π_θ = π_ref: the anchor is 0 and its gradient (softmax(z_θ) − π_ref) vanishes."""
    ref = copy.deepcopy(tiny_model)
    batch, _ = collate(arith_examples(tokenizer), tokenizer.pad_token_id)
    hidden = decoder_hidden(tiny_model, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        ref_hidden = decoder_hidden(ref, batch.input_ids, batch.attention_mask)
    kl = ref_kl(tiny_model, hidden, ref, ref_hidden, batch.loss_mask, chunk_tokens=4)
    assert kl.abs().max().item() < 1e-6
    grads = torch.autograd.grad(kl.sum(), list(tiny_model.parameters()), allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) < 1e-5


# ---------------------------------------------------------------------------------------------------- PSFT on the model


def test_psft_first_minibatch_gradient_equals_sft(tiny_model, tokenizer):
    """old = current log-probs (ratio 1, as right after a snapshot): PSFT's parameter gradient is SFT's."""
    batch, _ = collate(arith_examples(tokenizer), tokenizer.pad_token_id)
    ctx = full_ctx(batch)

    def grads(name):
        tiny_model.zero_grad(set_to_none=True)
        hidden = decoder_hidden(tiny_model, batch.input_ids, batch.attention_mask)
        lp, _ = token_logprobs(tiny_model, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=7)
        batch.extras["old_logprobs"] = lp.detach()
        loss, _ = losses.get_loss_class(name)()(lp, batch, ctx)
        loss.backward()
        return [p.grad.clone() for p in tiny_model.parameters()]

    for a, b in zip(grads("psft"), grads("sft")):
        assert_close(a, b, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- through the trainer


def test_psft_through_the_trainer(tmp_path):
    """minibatches=4 on batch_size 8: one old-policy snapshot per 32 examples and 4 optimizer steps on it; the first
    step after each snapshot has ratio 1 and SFT's gradient (checked against SFT on the same rows, same weights)."""
    cfg = tiny_config(tmp_path, loss={"name": "psft", "minibatches": 4},
                      train={"steps": 8, "batch_size": 8, "micro_batch_size": 3, "lr": 3e-3, "grad_clip": None})
    t = trainer_for(cfg)
    t.setup()
    init = copy.deepcopy(t.model)
    fills, seen, captured = [], [], []
    real_fill, real_step, real_opt_step = t._fill_needs, t.backend.step, t._optimizer_step

    def fill(batch, units):
        out = real_fill(batch, units)
        fills.append((len(units), batch.extras["old_logprobs"].clone(), batch.loss_mask.clone()))
        return out

    def opt_step(batch, units):
        seen.append((batch, units))
        return real_opt_step(batch, units)

    def step():
        if not captured:
            captured.append([p.grad.clone() for p in t.model.parameters()])
        return real_step()

    t._fill_needs, t._optimizer_step, t.backend.step = fill, opt_step, step
    t.fit()
    assert t.step == 8 and len(fills) == 2 and all(n == 32 for n, _, _ in fills)
    old, mask = fills[0][1], fills[0][2]
    assert (old[mask] < 0).all() and (old[~mask] == 0).all()
    rows = train_rows(cfg["run_dir"])
    assert len(rows) == 8
    for i in (0, 4):  # first step after each snapshot: π_θ = π_old
        assert rows[i]["ratio"] == pytest.approx(1.0, abs=1e-5) and rows[i]["clip_frac"] == 0.0
    assert any(abs(r["ratio"] - 1.0) > 1e-3 for r in rows[1:4])  # later mini-batches see the updated policy
    assert rows[-1]["nll"] < rows[0]["nll"]

    # SFT's gradient on the first mini-batch, from the initial weights, with the trainer's own micro-batch plan
    from align.collate import plan_micro_batches

    batch, units = seen[0]
    rows_all = [r for u in units for r in u]
    ctx = t._context(batch, rows_all, 1)
    sft = losses.get_loss_class("sft")()
    for mb_rows in plan_micro_batches(batch, units, 3):
        mb = batch.select(mb_rows)
        hidden = decoder_hidden(init, mb.input_ids, mb.attention_mask)
        lp, _ = token_logprobs(init, hidden, mb.input_ids, mb.loss_mask)
        sft(lp, mb, ctx)[0].backward()
    for (n, p), g in zip(init.named_parameters(), captured[0]):
        assert_close(g, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_psft_epochs_and_derived_step_count(tmp_path):
    """epochs=2, minibatches=2, 64 rows, batch_size 8: 4 experience batches × 2 × 2 = 16 steps per data epoch."""
    cfg = tiny_config(tmp_path, loss={"name": "psft", "minibatches": 2, "epochs": 2},
                      train={"steps": None, "epochs": 1, "batch_size": 8, "micro_batch_size": 8})
    t = trainer_for(cfg)
    t.setup()
    assert t.total_steps == 16
    fills = []
    real_fill = t._fill_needs
    t._fill_needs = lambda b, u: (fills.append(len(u)), real_fill(b, u))[1]
    t.fit(max_steps=8)
    assert t.step == 8 and fills == [16, 16]  # 4 steps (2 passes × 2 mini-batches) per snapshot


def test_asft_through_the_trainer(tmp_path):
    """A short ASFT run: loss falls, the anchor starts at 0 and grows, the frozen reference never moves."""
    cfg = tiny_config(tmp_path, loss={"name": "asft", "kl_weight": 0.1},
                      train={"steps": 12, "batch_size": 16, "micro_batch_size": 8, "lr": 3e-3},
                      model={"chunk_tokens": 16})
    t = trainer_for(cfg)
    t.setup()
    ref_before = {k: v.clone() for k, v in t.ref_model.state_dict().items()}
    t.fit()
    rows = train_rows(cfg["run_dir"])
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["ref_kl"] < 1e-5 and rows[-1]["ref_kl"] > 1e-3
    assert rows[-1]["nll"] < rows[0]["nll"]
    assert all(torch.equal(v, t.ref_model.state_dict()[k]) for k, v in ref_before.items())
    assert all(p.grad is None for p in t.ref_model.parameters())
