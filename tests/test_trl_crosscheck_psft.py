"""align's psft against TRL's GRPO loss with advantages ≡ 1 and loss_type="dapo" (LOSSES.md §5 cross-check).

TRL's `GRPOTrainer._compute_loss` takes prompt / completion ids, old per-token log-probs and advantages, runs the
model and returns −min(ρÂ, clip(ρ, 1−ε, 1+ε_high)Â) summed over completion tokens / `num_items_in_batch` (A1). With
Â = 1 that is PSFT. The prompts all have the same length so TRL's left padding of prompts is a no-op and both sides
see the same positions.
"""

import math

import pytest
import torch
from torch.testing import assert_close

import losses
from align.collate import collate
from align.config import DataConfig
from align.data import Tokenizer
from align.head import decoder_hidden, token_logprobs
from losses import LossContext

pytestmark = pytest.mark.filterwarnings("ignore")


def _examples(tokenizer):
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    out = []
    for i in range(6):
        a, b = 11 + 7 * i, 23 + 5 * i  # two-digit operands: every prompt has the same token length
        prompt = [{"role": "user", "content": f"What is {a}+{b}?"}]
        completion = [{"role": "assistant", "content": str(a + b) * (1 + i % 3)}]
        out.append(tk.example({"prompt": prompt, "completion": completion}, i, "prompt_completion"))
    return out


def test_psft_equals_trl_grpo_dapo_with_unit_advantages(tiny_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    examples = _examples(tokenizer)
    batch, _ = collate(examples, tokenizer.pad_token_id)
    starts = [int(m.float().argmax()) for m in batch.loss_mask]
    assert len(set(starts)) == 1
    P = starts[0]  # prompt length, the same for every row

    # align: current log-probs, then an old policy whose ratios ρ = π/π_old spread over [0.5, 1.7]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask)
    lp, _ = token_logprobs(model, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=7)
    g = torch.Generator().manual_seed(0)
    rho = torch.rand(lp.shape, generator=g) * 1.2 + 0.5
    old = torch.where(batch.loss_mask, lp.detach() - rho.log(), torch.zeros_like(lp))
    batch.extras["old_logprobs"] = old
    ctx = LossContext(num_tokens=float(batch.loss_mask.sum()), num_sequences=len(batch), num_micro_batches=1,
                      max_length=64)
    loss, metrics = losses.get_loss_class("psft")()(lp, batch, ctx)
    loss.backward()
    assert 0.05 < metrics["clip_frac"] < 0.9  # both branches are exercised

    # TRL: its trainer's own loss on the same sequences split at P, with advantages = 1
    trl_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, loss_type="dapo", beta=0.0,
                      epsilon=0.2, epsilon_high=0.28, per_device_train_batch_size=6, num_generations=2, report_to=[],
                      max_completion_length=batch.seq_len - P)
    trainer = GRPOTrainer(model=trl_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 6), processing_class=tokenizer)
    trainer.model.eval()  # no dropout either way; eval mode makes TRL normalise by num_items_in_batch alone
    completion_mask = batch.loss_mask[:, P:].long()
    inputs = {
        "prompt_ids": batch.input_ids[:, :P], "prompt_mask": batch.attention_mask[:, :P].long(),
        "completion_ids": batch.input_ids[:, P:], "completion_mask": completion_mask,
        "advantages": torch.ones(len(batch)), "old_per_token_logps": old[:, P:],
        "num_items_in_batch": completion_mask.sum(),
    }
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    assert math.isfinite(loss.item())
    assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)
    trl_params = dict(trainer.model.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, trl_params[n].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
