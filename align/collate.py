"""Examples → the Batch contract, and the micro-batch plan that wastes little compute on padding.

Micro-batches are length-grouped: the examples of an optimizer step are sorted by length and cut into groups of
``micro_batch_size`` examples (or up to a padded-token budget), so sequences of similar length share a micro-batch.
Preference pairs stay together. Because every reduction divides by optimizer-batch counts (losses/reduce.py), how
the step is cut does not change the loss (for the split-independent aggregation modes).
"""

from __future__ import annotations

import torch

from losses import Batch
from rollouts.types import Example


def collate(examples: list[Example], pad_id: int) -> tuple[Batch, list[list[int]]]:
    """Right-padded Batch of every sample, and for each example the rows it occupies."""
    samples, units, groups, index = [], [], [], []
    for e_i, ex in enumerate(examples):
        rows = []
        for s in ex.samples:
            rows.append(len(samples))
            samples.append(s)
            groups.append(ex.group if ex.group is not None else e_i)
            index.append(ex.index)
        units.append(rows)
    B = len(samples)
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.bool)
    lmask = torch.zeros((B, T), dtype=torch.bool)
    extras: dict[str, torch.Tensor] = {}
    keys = {k for s in samples for k in s.fields}
    for k in keys:
        per_token = any(isinstance(s.fields.get(k), list) for s in samples)
        extras[k] = torch.zeros((B, T) if per_token else (B,), dtype=torch.float32)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        att[r, :n] = True
        lmask[r, :n] = torch.tensor(s.loss_mask, dtype=torch.bool)
        for k, v in s.fields.items():
            if isinstance(v, list):
                extras[k][r, : len(v)] = torch.tensor(v, dtype=torch.float32)
            else:
                extras[k][r] = float(v)
    extras["index"] = torch.tensor(index, dtype=torch.long)
    batch = Batch(input_ids=ids, attention_mask=att, loss_mask=lmask,
                  group_ids=torch.tensor(groups, dtype=torch.long), extras=extras)
    return batch, units


def plan_micro_batches(batch: Batch, units: list[list[int]], micro_batch_size: int,
                       micro_batch_tokens: int | None = None) -> list[list[int]]:
    """Rows of each micro-batch: units sorted by length (longest first), grouped by count or padded-token budget."""
    lengths = batch.attention_mask.sum(1).tolist()
    unit_len = [max(lengths[r] for r in u) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-unit_len[u], u))
    plan: list[list[int]] = []
    current: list[int] = []
    current_rows, current_max, current_units = 0, 0, 0
    for u in order:
        rows = units[u]
        new_max = max(current_max, unit_len[u])
        full = (current_units >= micro_batch_size) if micro_batch_tokens is None else \
            (current_rows + len(rows)) * new_max > micro_batch_tokens
        if current and full:
            plan.append(current)
            current, current_rows, current_max, current_units = [], 0, 0, 0
            new_max = unit_len[u]
        current += rows
        current_rows += len(rows)
        current_max = new_max
        current_units += 1
    if current:
        plan.append(current)
    return plan
