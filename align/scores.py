"""One score per sequence from a sequence-classification model (a reward model): the forward behind
``output = "scores"`` losses (``losses/base.py``).

The score is transformers' own: ``AutoModelForSequenceClassification`` reads its head at each row's last token that
is not ``config.pad_token_id``. The ``reward_model`` reward (``rollouts/reward_model.py``) and TRL's
``RewardTrainer`` read it the same way, so a model trained here scores text identically when it is used as a reward.
The head on all T positions costs B·T·H multiply-adds for one label: nothing next to the decoder.
"""

from __future__ import annotations

import torch


def forward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   *, chunk_tokens: int = 1024, with_entropy: bool = False, n_chunks: int | None = None,
                   temperature: float = 1.0):
    """(None, (B,) fp32 scores, None): the signature of ``align.head.forward_logprobs``, so backends run either
    (``temperature`` scales log-probs only: a score is the raw head output)."""
    if getattr(model.config, "pad_token_id", None) is None:
        raise ValueError("a sequence-scoring model needs config.pad_token_id to find each row's last token; load it "
                         "with align.models.load_model(..., pad_token_id=tokenizer.pad_token_id)")
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).logits  # (B, 1)
    return None, logits[:, 0].float(), None


def forward_fn(output: str):
    """The backend forward for a loss's ``output``."""
    from .head import forward_logprobs

    fns = {"logprobs": forward_logprobs, "scores": forward_scores}
    if output not in fns:
        raise ValueError(f"unknown loss output {output!r}; one of {', '.join(fns)}")
    return fns[output]
