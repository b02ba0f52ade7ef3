"""align.drift.held_out_drift against KL(π_θ‖π_init) and NLL computed directly on full logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from align.collate import collate
from align.config import DataConfig
from align.data import Tokenizer
from align.drift import held_out_drift


def _examples(tokenizer, n=5):
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    return [tk.example({"prompt": [{"role": "user", "content": f"What is {i}+{2 * i + 3}?"}],
                        "completion": [{"role": "assistant", "content": str(3 * i + 3) * (1 + i % 2)}]},
                       i, "prompt_completion") for i in range(n)]


def test_drift_equals_full_vocabulary_kl_and_nll(tiny_model, tokenizer):
    init = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    examples = _examples(tokenizer)
    got = held_out_drift(tiny_model, init, examples, tokenizer.pad_token_id, batch_size=2, chunk_tokens=3)

    batch, _ = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        z = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float()[:, :-1]
        z0 = init(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float()[:, :-1]
    mask = batch.loss_mask[:, 1:]
    kl = F.kl_div(z0.log_softmax(-1), z.softmax(-1), reduction="none").sum(-1)  # KL(π_θ ‖ π_init), (B, T−1)
    nll = F.cross_entropy(z.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    assert got["kl"] == pytest.approx(float(kl[mask].mean()), abs=1e-6) and got["kl"] > 1e-3
    assert got["nll"] == pytest.approx(float(nll[mask].mean()), abs=1e-5)
    assert held_out_drift(init, init, examples, tokenizer.pad_token_id)["kl"] == pytest.approx(0.0, abs=1e-7)
