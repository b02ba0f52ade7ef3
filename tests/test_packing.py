"""Padding-free decoder forward (align/packing.py): the same hidden states and gradients as the padded forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from align.head import decoder_hidden
from align.packing import pack_plan, packed_decoder_hidden

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, attn_implementation="sdpa")


def _model(kind):
    torch.manual_seed(0)
    return (LlamaForCausalLM(LlamaConfig(**SHAPE)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**SHAPE)))


def _batch(lengths, t=None):
    t = t or max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (len(lengths), t), generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_forward_and_gradients_equal_padded(kind):
    model = _model(kind)
    ids, mask = _batch([40, 7, 23, 3], t=48)
    lengths = pack_plan(model, mask)
    assert lengths is not None and lengths.tolist() == [40, 7, 23, 3]
    decoder = model.get_decoder()
    padded = decoder(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
    packed = packed_decoder_hidden(decoder, ids, mask, lengths)
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)
    assert packed[~mask].abs().max() == 0
    w = torch.randn(padded.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    grads = []
    for h in (padded, packed):
        model.zero_grad()
        (h * w).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)  # fp32 summation order
    torch.testing.assert_close(decoder_hidden(model, ids, mask)[mask], padded[mask], rtol=1e-5, atol=1e-5)


def test_pack_plan_declines():
    model = _model("llama")
    ids, mask = _batch([9, 9, 9])
    assert pack_plan(model, mask) is None  # no padding
    _, right = _batch([12, 4])
    assert pack_plan(model, right.flip(1)) is None  # left padding (generation batches)
    assert pack_plan(model, right[:1]) is None  # one row
    _, many = _batch([4000] + [3900] * 15)  # attention over one 62k-token block would cost more than the padding saves
    assert pack_plan(model, many) is None
    model.config.model_type = "gpt2"
    assert pack_plan(model, right) is None  # a decoder not known to build block masks from position ids
