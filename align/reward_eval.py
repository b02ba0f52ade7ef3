"""Held-out pairwise accuracy of a reward model (``eval.pairs`` for a loss with ``output = "scores"``).

For each held-out pair the model scores the chosen and the rejected sequence, tokenised exactly as in training:

- ``pref_accuracy``         fraction of pairs with r_w > r_l (ties count as wrong; TRL's ``accuracy``)
- ``pref_margin``           mean r_w − r_l
- ``pref_reward_chosen``    mean r_w;  ``pref_reward_rejected``: mean r_l
- ``pref_sign_accuracy``    fraction of the 2P completions on the right side of 0 (r_w > 0, r_l < 0): how well
                            "reward > 0" alone separates right from wrong answers once the rewards are centred

The keys ``pref_accuracy`` / ``pref_margin`` are those of a policy's preference evaluation (``align/pref_eval.py``),
where the reward is DPO's implicit one.
"""

from __future__ import annotations

from typing import Callable

import torch

from losses import Batch
from rollouts.types import Example

from .collate import collate

ScoresFn = Callable[[torch.nn.Module, Batch, list[list[int]]], torch.Tensor]  # (model, batch, units) -> (B,)


@torch.no_grad()
def pair_scores(model, examples: list[Example], scores_fn: ScoresFn, pad_id: int, device,
                chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) chosen and (P,) rejected scores of the pairs, in the order of ``examples``."""
    was_training = model.training
    model.eval()
    chosen, rejected = torch.zeros(len(examples)), torch.zeros(len(examples))
    try:
        for start in range(0, len(examples), chunk):
            part = examples[start: start + chunk]
            batch, units = collate(part, pad_id)
            scores = scores_fn(model, batch.to(device), units).float().cpu()  # (B,)
            for i, (w, l) in enumerate(units):
                chosen[start + i], rejected[start + i] = scores[w], scores[l]
    finally:
        model.train(was_training)
    return chosen, rejected


def metrics_of(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "pref_accuracy": (chosen > rejected).float().mean().item(),
        "pref_margin": (chosen - rejected).mean().item(),
        "pref_reward_chosen": chosen.mean().item(),
        "pref_reward_rejected": rejected.mean().item(),
        "pref_sign_accuracy": torch.cat([chosen > 0, rejected < 0]).float().mean().item(),
    }


def reward_pair_metrics(model, examples: list[Example], scores_fn: ScoresFn, pad_id: int, device) -> dict[str, float]:
    return metrics_of(*pair_scores(model, examples, scores_fn, pad_id, device))


def eval_reward_model(model_path: str, cfg, device) -> dict[str, float]:
    """``align eval`` on a reward model (a run whose loss has ``output = "scores"``): held-out pairwise accuracy on
    ``eval.pairs``, each sequence scored by the saved model exactly as in training (align/scores.py)."""
    from .configio import ConfigError
    from .models import load_model, load_tokenizer
    from .pref_eval import load_pairs
    from .scores import forward_scores

    if not cfg.eval.pairs:
        raise ConfigError("a reward model is evaluated on held-out preference pairs: set eval.pairs, e.g. "
                          "eval.pairs=examples/data/arith/test_pairs.jsonl")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
    model = load_model(model_path, cfg.model, device, output="scores", pad_token_id=tokenizer.pad_token_id)
    examples = load_pairs(cfg.eval.pairs, tokenizer, cfg.data, cfg.eval.pairs_limit)

    def scores_fn(m, batch, units):
        return forward_scores(m, batch.input_ids, batch.attention_mask)[1]

    return reward_pair_metrics(model, examples, scores_fn, tokenizer.pad_token_id, device)
