"""grpo / dr_grpo / kl_pg / rloo against TRL's own GRPOTrainer._compute_loss and RLOOTrainer._compute_loss.

Both sides see the same tiny model, the same completions, the same advantages (from our group estimator, which
test_losses_pg.py checks against TRL's advantage formula) and the same old / reference log-probs, perturbed away
from the policy so that ratios leave the clip range and the KL term is non-zero. Loss and every parameter gradient
agree to 1e-5. Our side goes through align.head (chunked fp32 LM head) and the shared reduction.
"""

import pytest
import torch
from torch.testing import assert_close

import losses
from align.head import decoder_hidden, token_logprobs
from losses import Batch, LossContext

pytestmark = pytest.mark.filterwarnings("ignore")

GROUP = 4


def _completions(tokenizer, n=12, seed=0):
    """Prompts of one length (no left padding: TRL and we then see identical positions) and right-padded
    completions of different lengths, each ending with EOS."""
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer(f"<|user|>What is {10 + i}+{20 + i}?<|assistant|>", add_special_tokens=False)["input_ids"]
               for i in range(n // GROUP) for _ in range(GROUP)]
    assert len({len(p) for p in prompts}) == 1
    digits = tokenizer("0123456789", add_special_tokens=False)["input_ids"]
    completions = []
    for _ in range(n):
        length = int(torch.randint(1, 7, (1,), generator=g))
        completions.append([digits[int(torch.randint(0, 10, (1,), generator=g))] for _ in range(length)]
                           + [tokenizer.eos_token_id])
    C = max(len(c) for c in completions)
    prompt_ids = torch.tensor(prompts)
    completion_ids = torch.full((n, C), tokenizer.pad_token_id)
    completion_mask = torch.zeros(n, C, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])[:n]  # last group all-equal
    return prompt_ids, completion_ids, completion_mask, rewards


def _our_side(model, loss_fn, prompt_ids, completion_ids, completion_mask, rewards, seed=1):
    """Batch in our layout, perturbed old/ref log-probs, prepare + loss. Returns the loss, the batch and the
    completion-aligned (old, ref, advantages) to hand to TRL."""
    n, P = prompt_ids.shape
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1).bool()
    loss_mask = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1).bool()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp, _ = token_logprobs(model, decoder_hidden(model, input_ids, attention), input_ids, loss_mask)
    old = (lp + 0.3 * torch.randn(lp.shape, generator=g)) * loss_mask  # ratios e^{±0.3}: some clipped
    ref = (lp + 0.5 * torch.randn(lp.shape, generator=g)) * loss_mask
    batch = Batch(input_ids, attention, loss_mask, torch.arange(n) // GROUP,
                  {"reward": rewards, "old_logprobs": old, "ref_logprobs": ref})
    ctx = LossContext(num_tokens=float(loss_mask.sum()), num_sequences=n, num_micro_batches=1,
                      max_length=input_ids.shape[1])
    batch = loss_fn.prepare(batch, ctx)
    hidden = decoder_hidden(model, input_ids, attention)
    logprobs, _ = token_logprobs(model, hidden, input_ids, loss_mask, chunk_tokens=7)
    loss, metrics = loss_fn(logprobs, batch, ctx)
    loss.backward()
    adv = batch.extras["advantages"][:, P:]  # (n, C): one advantage per completion, on each of its tokens
    assert torch.equal(adv, adv[:, :1] * completion_mask)
    return loss, metrics, old[:, P:], ref[:, P:], adv[:, 0]


def _assert_same_loss_and_gradients(loss, model, trainer, inputs):
    """TRL's _compute_loss on `inputs` gives our loss and our gradient on every parameter (1e-5)."""
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)
    trl_grads = dict(trainer.model.named_parameters())
    for pname, p in model.named_parameters():
        assert_close(p.grad, trl_grads[pname].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{pname}: {m}")


# (our loss, our options, TRL GRPOConfig overrides)
CASES = {
    "grpo": ("grpo", {}, dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False)),
    "dapo": ("kl_pg", dict(beta=0.04, epsilon_high=0.28),
             dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, use_bias_correction_kl=False)),
    "dapo+bias_correction_kl": ("kl_pg", dict(beta=0.04, kl_weight="ratio"),
                                dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)),
    "dr_grpo": ("dr_grpo", dict(beta=0.04, max_completion_length=12),
                dict(loss_type="dr_grpo", beta=0.04, max_completion_length=12, use_bias_correction_kl=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_family_equals_trl_grpo_trainer(tiny_dir, tokenizer, tmp_path, case):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    name, options, trl_options = CASES[case]
    prompt_ids, completion_ids, completion_mask, rewards = _completions(tokenizer)
    n = len(rewards)

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    cls = losses.get_loss_class(name)
    loss, metrics, old, ref, adv = _our_side(model, cls(cls.Options(**options)), prompt_ids, completion_ids,
                                             completion_mask, rewards)

    trl_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, num_generations=GROUP,
                      per_device_train_batch_size=n, report_to=[], **{"max_completion_length": 12, **trl_options})
    trainer = GRPOTrainer(model=trl_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * n), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # what HF's training loop sets with gradient_accumulation_steps=1
    trainer.model.train()
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    _assert_same_loss_and_gradients(loss, model, trainer, inputs)
    logged = trainer._metrics["train"]
    assert metrics["kl_term"] == pytest.approx(logged["kl"][-1], abs=1e-5)
    if "clip_ratio/region_mean" in logged:
        assert metrics["clip_frac"] == pytest.approx(logged["clip_ratio/region_mean"][-1], abs=1e-6)
        assert metrics["clip_frac"] > 0  # the perturbed old log-probs do exercise the clip


def test_rloo_equals_trl_rloo_trainer(tiny_dir, tokenizer, tmp_path):
    """rloo preset (sequence-level ratio, mean over sequences) against RLOOTrainer._compute_loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    prompt_ids, completion_ids, completion_mask, rewards = _completions(tokenizer, seed=3)
    n = len(rewards)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    loss, metrics, old, ref, adv = _our_side(model, losses.get_loss_class("rloo")(), prompt_ids, completion_ids,
                                             completion_mask, rewards, seed=4)

    trl_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    args = RLOOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, num_generations=GROUP,
                      per_device_train_batch_size=n, report_to=[], max_completion_length=12)
    trainer = RLOOTrainer(model=trl_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * n), processing_class=tokenizer)
    trainer.model.train()
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": adv, "old_logps": (old * completion_mask).sum(1),
    }
    _assert_same_loss_and_gradients(loss, model, trainer, inputs)
