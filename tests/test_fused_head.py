"""align/fused_head.py: the one-buffer linear + log-prob function against plain autograd on the full logits."""

import pytest
import torch
from torch.testing import assert_close

from align.fused_head import LinearLogprobs, plain_linear_head
from align.head import token_logprobs


def _reference(h, w, b, y, scale, softcap, inv_t):
    z = torch.nn.functional.linear(h, w, b).double() * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return torch.log_softmax(z * inv_t, -1).gather(-1, y[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("bias,scale,softcap,temperature", [
    (False, 1.0, None, 1.0),
    (True, 1.0, None, 0.7),
    (False, 0.5, 4.0, 1.3),  # logit scale, Gemma-2-style soft-cap and a temperature together
])
def test_values_and_gradients_equal_autograd(chunk, bias, scale, softcap, temperature):
    g = torch.Generator().manual_seed(0)
    N, H, V = 13, 8, 37
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)  # an arbitrary ∂loss/∂lp per token (not just sum)
    want = _reference(h, w, b, y, scale, softcap, 1 / temperature)
    params = [t for t in (h, w, b) if t is not None]
    g_want = torch.autograd.grad((want * upstream).sum(), params)
    got = LinearLogprobs.apply(h.float(), w.float(), None if b is None else b.float(), y, chunk, scale, softcap,
                               1 / temperature)
    assert got.dtype == torch.float32
    assert_close(got.double(), want, atol=1e-5, rtol=0)
    hf, wf = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    bf = None if b is None else b.detach().float().requires_grad_(True)
    out = LinearLogprobs.apply(hf, wf, bf, y, chunk, scale, softcap, 1 / temperature)
    g_got = torch.autograd.grad((out * upstream.float()).sum(), [t for t in (hf, wf, bf) if t is not None])
    for a, e in zip(g_got, g_want):
        assert_close(a.double(), e, atol=1e-5, rtol=1e-4)


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    w = torch.randn(11, 4, generator=g)  # frozen (a reference model, or LoRA's base head)
    y = torch.randint(0, 11, (5,), generator=g)
    LinearLogprobs.apply(h, w, None, y, 2, 1.0, None, 1.0).sum().backward()
    assert h.grad is not None and w.grad is None
    want = torch.autograd.grad(_reference(h, w, None, y, 1.0, None, 1.0).sum(), h)[0]
    assert_close(h.grad, want, atol=1e-5, rtol=1e-4)


def test_bf16_matches_the_checkpointed_path(tiny_model, tokenizer):
    """In bf16 the fused path rounds like the generic one (bf16 matmuls, fp32 log-softmax)."""
    import copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=g).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(7, len(tokenizer), (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    fused, _ = token_logprobs(model, hidden, ids, mask, chunk_tokens=4)
    generic, _ = token_logprobs(model, hidden, ids, mask, chunk_tokens=4, n_chunks=5)  # n_chunks: generic path
    assert_close(fused, generic, atol=2e-2, rtol=0)
    gf = torch.autograd.grad(fused.sum(), [hidden, model.lm_head.weight])
    gg = torch.autograd.grad(generic.sum(), [hidden, model.lm_head.weight])
    for a, b in zip(gf, gg):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_other_heads_take_the_checkpointed_path(tiny_model):
    """Hooks (ZeRO-3 gathers, adapters) or a non-Linear head: the generic path, which calls the module."""
    assert plain_linear_head(tiny_model) is not None
    handle = tiny_model.lm_head.register_forward_pre_hook(lambda m, a: None)
    try:
        assert plain_linear_head(tiny_model) is None
    finally:
        handle.remove()

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Wrapped(torch.nn.Linear(4, 9, bias=False))

        def get_output_embeddings(self):
            return self.head

    assert plain_linear_head(M()) is None
