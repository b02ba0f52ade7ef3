"""align's dpo (sigmoid, ipo_mean, robust) against TRL 1.16's DPOTrainer on the same tiny policy, reference and pairs.

TRL tokenises the rows itself; we check that it produces the very ids align does, then compare the loss (1e-5) and
the gradient of every parameter. TRL's `ipo` is length-normalised (our `ipo_mean`); its `sigmoid` applies no label
smoothing at this version and `robust` takes ε as `label_smoothing` (LOSSES.md §2.5).
"""

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


def _rows(n=6):
    return [{"prompt": [{"role": "user", "content": f"What is {i}+{3 * i}?"}],
             "chosen": [{"role": "assistant", "content": str(4 * i)}],
             "rejected": [{"role": "assistant", "content": str(4 * i + 1) * (1 + i % 3)}]} for i in range(n)]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from align.tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny_ref") / "model"), seed=1)  # a reference ≠ the policy


@pytest.mark.parametrize("variant, trl_type, eps", [("sigmoid", "sigmoid", 0.0), ("ipo_mean", "ipo", 0.0),
                                                    ("robust", "robust", 0.1)])
def test_dpo_equals_trl(tiny_dir, ref_dir, tokenizer, tmp_path, variant, trl_type, eps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = _rows()
    beta = 0.1
    # TRL: its own tokenisation, collator and compute_loss, with an explicit (different) reference model
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, loss_type=[trl_type], beta=beta,
                     label_smoothing=eps, report_to=[], max_length=None, per_device_train_batch_size=len(rows))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(trl_rows)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    # align: our tokenisation (must give TRL's ids), collate (chosen and rejected interleaved), chunked head, loss
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    examples = [tk.example(r, i, "preference") for i, r in enumerate(rows)]
    for ex, t in zip(examples, trl_rows):
        chosen, rejected = ex.samples
        assert chosen.input_ids == t["prompt_ids"] + t["chosen_ids"]
        assert rejected.input_ids == t["prompt_ids"] + t["rejected_ids"]
        assert sum(chosen.loss_mask) == len(t["chosen_ids"])
    batch, _ = collate(examples, tokenizer.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    with torch.no_grad():
        ref_hidden = decoder_hidden(ref, batch.input_ids, batch.attention_mask)
        batch.extras["ref_logprobs"], _ = token_logprobs(ref, ref_hidden, batch.input_ids, batch.loss_mask)
    hidden = decoder_hidden(policy, batch.input_ids, batch.attention_mask)
    lp, _ = token_logprobs(policy, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=5)
    ctx = LossContext(num_tokens=float(batch.loss_mask.sum()), num_sequences=len(batch), num_micro_batches=1,
                      max_length=64)
    cls = losses.get_loss_class("dpo")
    loss, metrics = cls(cls.Options(beta=beta, variant=variant, label_smoothing=eps))(lp, batch, ctx)
    loss.backward()

    assert abs(trl_loss.item()) > 1e-3  # a non-trivial value: policy and reference differ
    assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)
    for n, p in policy.named_parameters():
        assert_close(p.grad, trl_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    trl_metrics = trainer._metrics["train"]
    assert metrics["rewards/accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"][-1])
    assert metrics["rewards/margins"] == pytest.approx(trl_metrics["rewards/margins"][-1], abs=1e-5)
