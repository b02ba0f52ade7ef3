"""Experience sources: where the trainer's batches come from.

``DatasetSource`` serves fixed examples (demonstrations, preference pairs) in a seeded order that is reshuffled
every epoch; its position is part of the checkpoint so a resumed run sees exactly the examples it would have seen.
"""

from __future__ import annotations

import random

from .types import Example


class DatasetSource:
    """Batches of ``batch_size`` examples from a fixed list, epoch after epoch."""

    online = False  # the trainer pushes weights to an engine only for online (rollout) sources
    provides: frozenset[str] = frozenset()  # batch extras this source fills in itself

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if not examples:
            raise ValueError("the training data has no usable examples")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # examples of the current epoch's order already served (all ranks)
        self._order = self._make_order()

    def __len__(self) -> int:
        return len(self.examples)

    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def _make_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def next_batch(self, size: int | None = None) -> list[Example]:
        """The next ``size`` examples (default batch_size) of the global batch that belong to this rank."""
        size = size or self.batch_size
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._make_order()
        idx = self._order[self.position : self.position + size]
        self.position += len(idx)
        return [self.examples[i] for i in idx[self.rank :: self.world_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._make_order()
