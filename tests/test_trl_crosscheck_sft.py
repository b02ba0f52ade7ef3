"""align's sft / dft against TRL's SFTTrainer (loss_type "nll" / "dft") on the same tiny model and batch."""

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


def _examples(tokenizer, n=6):
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    rows = [({"role": "user", "content": f"What is {i}+{3 * i}?"}, {"role": "assistant", "content": str(4 * i) * (1 + i % 3)})
            for i in range(n)]
    return [tk.example({"prompt": [p], "completion": [c]}, i, "prompt_completion") for i, (p, c) in enumerate(rows)]


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_and_dft_equal_trl(tiny_dir, tokenizer, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    examples = _examples(tokenizer)
    rows = [{"input_ids": e.samples[0].input_ids, "completion_mask": [int(m) for m in e.samples[0].loss_mask]}
            for e in examples]

    # TRL: its own trainer, collator and compute_loss (with num_items_in_batch = the batch's loss tokens, A1)
    trl_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, loss_type=loss_type,
                     per_device_train_batch_size=len(rows), report_to=[], max_length=None, completion_only_loss=True)
    trainer = SFTTrainer(model=trl_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    n_items = int((inputs["labels"][:, 1:] != -100).sum())
    trl_loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=torch.tensor(n_items))
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    # align: our collate, chunked head and loss
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    batch, _ = collate(examples, tokenizer.pad_token_id)
    assert n_items == int(batch.loss_mask.sum())
    hidden = decoder_hidden(model, batch.input_ids, batch.attention_mask)
    lp, _ = token_logprobs(model, hidden, batch.input_ids, batch.loss_mask, chunk_tokens=7)
    ctx = LossContext(num_tokens=float(batch.loss_mask.sum()), num_sequences=len(batch), num_micro_batches=1,
                      max_length=64)
    name = {"nll": "sft", "dft": "dft"}[loss_type]
    loss, _ = losses.get_loss_class(name)()(lp, batch, ctx)
    loss.backward()

    assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        assert_close(p.grad, trl_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
