"""The chunked fp32 log-prob head and the full-vocabulary reference KL against unchunked autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from align.head import decoder_hidden, ref_kl, token_logprobs


def _batch(tokenizer, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    lengths = [9, 6, 4][:n]
    T = max(lengths)
    ids = torch.randint(7, V, (n, T), generator=g)
    att = torch.zeros(n, T, dtype=torch.bool)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i, L in enumerate(lengths):
        att[i, :L] = True
        mask[i, 2:L] = True
        ids[i, L:] = tokenizer.pad_token_id
    return ids, att, mask


def _full_logprobs(model, ids, att, mask):
    logits = model(input_ids=ids, attention_mask=att.long()).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    out = torch.zeros(ids.shape)
    out[:, 1:] = lp
    return out * mask


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_logprobs_equal_full_log_softmax(tiny_model, tokenizer, chunk):
    ids, att, mask = _batch(tokenizer)
    ref = _full_logprobs(tiny_model, ids, att, mask)
    g_ref = torch.autograd.grad(ref.sum(), list(tiny_model.parameters()))
    hidden = decoder_hidden(tiny_model, ids, att)
    lp, ent = token_logprobs(tiny_model, hidden, ids, mask, chunk_tokens=chunk, with_entropy=True)
    assert_close(lp, ref, atol=1e-5, rtol=0)
    assert (lp[~mask] == 0).all()
    g = torch.autograd.grad(lp.sum(), list(tiny_model.parameters()))
    for a, b in zip(g, g_ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    # entropy at trained positions equals the entropy of the full softmax
    logits = tiny_model(input_ids=ids, attention_mask=att.long()).logits.float()[:, :-1]
    full_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert_close(ent[:, 1:][mask[:, 1:]], full_ent[mask[:, 1:]], atol=1e-5, rtol=0)


def test_temperature_divides_logits(tiny_model, tokenizer):
    ids, att, mask = _batch(tokenizer)
    logits = tiny_model(input_ids=ids, attention_mask=att.long()).logits.float() / 0.7
    want = torch.zeros(ids.shape)
    want[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    hidden = decoder_hidden(tiny_model, ids, att)
    lp, _ = token_logprobs(tiny_model, hidden, ids, mask, chunk_tokens=5, temperature=0.7)
    assert_close(lp, want * mask, atol=1e-5, rtol=0)


def test_empty_mask_is_connected_zero(tiny_model, tokenizer):
    ids, att, mask = _batch(tokenizer)
    hidden = decoder_hidden(tiny_model, ids, att)
    lp, _ = token_logprobs(tiny_model, hidden, ids, torch.zeros_like(mask))
    assert lp.abs().sum() == 0 and lp.requires_grad
    lp.sum().backward()


def test_ref_kl_equals_kl_div_on_full_logits(tiny_model, tokenizer, tiny_dir):
    from align.config import ModelConfig
    from align.models import load_model

    ref = load_model(tiny_dir, ModelConfig(name=tiny_dir), torch.device("cpu")).requires_grad_(False)
    with torch.no_grad():  # make the policy differ from the reference
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids, att, mask = _batch(tokenizer)
    pol_logits = tiny_model(input_ids=ids, attention_mask=att.long()).logits.float()[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=att.long()).logits.float()[:, :-1]
    full = F.kl_div(pol_logits.log_softmax(-1), ref_logits.softmax(-1), reduction="none").sum(-1)
    want = torch.zeros(ids.shape)
    want[:, 1:] = full
    want = want * mask
    g_want = torch.autograd.grad(want.sum(), list(tiny_model.parameters()))
    hidden = decoder_hidden(tiny_model, ids, att)
    with torch.no_grad():
        ref_hidden = decoder_hidden(ref, ids, att)
    got = ref_kl(tiny_model, hidden, ref, ref_hidden, mask, chunk_tokens=3)
    assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.autograd.grad(got.sum(), list(tiny_model.parameters()))
    for a, b in zip(g, g_want):
        assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in ref.parameters())
