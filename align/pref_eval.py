"""Preference accuracy on held-out pairs (``eval.pairs``): does the policy prefer the chosen completion?

For each held-out pair, with sequence log-probs (masked sums over completion tokens, LOSSES.md §2.1) of the policy
π_θ and of the reference π_ref (this stage's initial weights, precomputed once and cached like the training
reference):

- ``pref_accuracy``      fraction of pairs with h > 0, h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) −
                         log π_ref(y_l)]: DPO's implicit-reward accuracy (TRL's ``rewards/accuracies``; independent
                         of β). At the start of a stage the policy *is* the reference, so h = 0 and this is 0.
- ``pref_margin``        mean h (nats)
- ``pref_logp_accuracy`` fraction of pairs with log π_θ(y_w) > log π_θ(y_l): the policy's own ranking, meaningful
                         at any point (also for an SFT model).
"""

from __future__ import annotations

import dataclasses

import torch

from rollouts.types import Example

from .data import DataError, load_examples
from .reference import LogprobsFn, RefLogprobs, compute


def load_pairs(spec: str, tokenizer, data_cfg, limit: int | None = None) -> list[Example]:
    """Held-out pairs, tokenised exactly like training pairs (same template, max_length, checks)."""
    cfg = dataclasses.replace(data_cfg, format="auto", limit=limit)
    examples, _, fmt = load_examples(spec, tokenizer, cfg, progress=False)
    if fmt != "preference":
        raise DataError(spec, None, None, f"eval.pairs needs prompt/chosen/rejected rows, got '{fmt}' data",
                        "point eval.pairs at a preference file (python -m align.tasks.arithmetic writes test_pairs.jsonl)")
    return examples


def _sums(ref: RefLogprobs) -> dict[tuple[int, int], float]:
    cs = torch.zeros(len(ref.values) + 1, dtype=torch.float64)
    cs[1:] = torch.cumsum(ref.values.double(), 0)
    sums = (cs[ref.offsets[1:]] - cs[ref.offsets[:-1]]).tolist()
    return {(int(r), int(s)): v for r, s, v in zip(ref.rows.tolist(), ref.slots.tolist(), sums)}


@torch.no_grad()
def preference_metrics(model, examples: list[Example], ref: RefLogprobs, logprobs_fn: LogprobsFn, pad_id: int,
                       device) -> dict[str, float]:
    policy = _sums(compute(model, examples, logprobs_fn, pad_id, device, progress=False))
    reference = _sums(ref)
    wins = logp_wins = 0
    margin = 0.0
    for ex in examples:
        pw, pl = policy[(ex.index, 0)], policy[(ex.index, 1)]
        h = (pw - reference[(ex.index, 0)]) - (pl - reference[(ex.index, 1)])
        wins += h > 0
        margin += h
        logp_wins += pw > pl
    n = len(examples)
    return {"pref_accuracy": wins / n, "pref_margin": margin / n, "pref_logp_accuracy": logp_wins / n}
