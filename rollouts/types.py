"""What experience sources hand to the trainer: plain Python, no tensors, no trainer imports.

A :class:`Sample` is one token sequence with its loss mask and per-sequence or per-token fields. An
:class:`Example` is the unit the trainer keeps together in one micro-batch: one sample (SFT, one rollout) or two
(a preference pair: chosen, rejected).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    input_ids: list[int]  # prompt + completion token ids
    loss_mask: list[bool]  # True on the tokens a loss trains on (same length as input_ids)
    fields: dict[str, float | list[float]] = field(default_factory=dict)  # scalars per sequence, lists per token

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) differ in length")

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Example:
    samples: list[Sample]  # 1 sample, or [chosen, rejected] for a preference pair
    index: int = -1  # row of the source dataset (for error messages and cached per-row values)
    group: int | None = None  # examples sharing a group come from the same prompt (n rollouts per prompt)

    def __len__(self) -> int:
        return max(len(s.input_ids) for s in self.samples)
