"""The one data contract between experience sources and losses.

Every loss reads a :class:`Batch`. Rows are right-padded sequences. Position ``t`` of any per-token tensor refers to
token ``input_ids[:, t]``: ``logprobs[:, t] = log π(input_ids[:, t] | input_ids[:, :t])``, so position 0 never
carries a loss and ``loss_mask[:, 0]`` is always False.

Extras follow one shape rule: a 2-D extra of shape ``(B, T)`` is per token, a 1-D extra of shape ``(B,)`` is per
sequence. :meth:`Batch.select` keeps both consistent when the trainer cuts micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    loss_mask: torch.Tensor  # (B, T) bool, True on tokens the loss trains on (completion / assistant tokens)
    group_ids: torch.Tensor | None = None  # (B,) long: the prompt / pair a row belongs to
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T) per token or (B,) per sequence

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, rows: torch.Tensor | list[int], crop: bool = True) -> "Batch":
        """Rows ``rows`` (in that order), cropped to their longest sequence when ``crop``."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        length = self.seq_len
        if crop and len(rows):
            length = max(int(self.attention_mask[rows].sum(1).max()), 1)

        def cut(x: torch.Tensor) -> torch.Tensor:
            x = x.index_select(0, rows)
            return x[:, :length] if x.dim() >= 2 else x

        return Batch(
            input_ids=cut(self.input_ids),
            attention_mask=cut(self.attention_mask),
            loss_mask=cut(self.loss_mask),
            group_ids=None if self.group_ids is None else cut(self.group_ids),
            extras={k: cut(v) for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            group_ids=None if self.group_ids is None else self.group_ids.to(device),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )

    def pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a per-row tensor into (chosen, rejected) halves.

        Preference batches hold pair ``i`` in rows ``2i`` (chosen) and ``2i + 1`` (rejected).
        """
        if x.shape[0] % 2:
            raise ValueError(f"a preference batch needs an even number of rows, got {x.shape[0]}")
        return x[0::2], x[1::2]
