"""A rollout source followed by steps that act on each batch's scored samples, before the loss sees them.

    batch = source.next_batch()              # prompts → n samples each → rewards   (RolloutSource)
    for step in steps:                       # e.g. reference-rank counts (BOND), Best-of-n selection (BoN-SFT),
        batch = step(batch, prompts, index)  #      best/worst pairs (online DPO)

This is how the Best-of-N algorithms compose on the one loop: BoN-SFT is the ``sft`` loss on a source whose last step
keeps the best sample of each prompt; online DPO is ``dpo`` on best/worst pairs; BOND and vBoN are policy-gradient
losses on samples annotated with their rank among reference samples (STYLE.md "do" 4).

A step is ``step(examples, prompts, batch_index) -> examples`` with a ``metrics`` dict, and optionally
``state_dict`` / ``load_state_dict`` (saved with the checkpoint) and ``placeholder(raw_examples) -> Example`` (the
shape of its output, for a batch in which nothing was kept). A batch in which nothing is kept is returned empty
(the trainer then takes no step and draws the next batch); ``max_empty`` such batches in a row stop the run with an
error. The source also counts every sample generated (policy and reference), the budget a comparison must equalise.
"""

from __future__ import annotations

from .types import Example


class SelectionError(RuntimeError):
    """Too many rollout batches in a row had no sample that a selection step kept."""


class ProcessedSource:
    online = True

    def __init__(self, source, steps: list, max_empty: int = 50):
        self.source = source
        self.steps = list(steps)
        self.max_empty = max_empty
        self.empty_in_a_row = 0
        self.counts = {"policy": 0, "reference": 0, "empty_batches": 0}
        self.last_metrics: dict[str, float] = {}
        self._placeholder: Example | None = None

    @property
    def provides(self):
        return getattr(self.source, "provides", frozenset())

    def __len__(self) -> int:
        return len(self.source)

    @property
    def examples(self) -> list[Example]:
        """A placeholder with the shape of this source's output (the trainer collates it for an empty batch)."""
        return [self._placeholder] if self._placeholder is not None else []

    def next_batch(self, size: int | None = None) -> list[Example]:
        batch_index = self.source.batches  # before next_batch advances it: the same index the rollout was seeded by
        raw = self.source.next_batch(size)
        prompts = self.source.last_prompts
        metrics = dict(self.source.last_metrics)
        self.counts["policy"] += len(raw)
        examples = raw
        for step in self.steps:
            placeholder = getattr(step, "placeholder", None)
            if placeholder is not None and raw:
                self._placeholder = self._placeholder or placeholder(raw)
            examples = step(examples, prompts, batch_index)
            metrics.update(step.metrics)
            self.counts["reference"] += int(step.metrics.get("reference/samples", 0))
        if examples:
            self._placeholder = examples[0]
            self.empty_in_a_row = 0
        elif raw:
            self.counts["empty_batches"] += 1
            self.empty_in_a_row += 1
            if self.empty_in_a_row >= self.max_empty:
                raise SelectionError(
                    f"{self.empty_in_a_row} rollout batches in a row had no sample the selection kept ("
                    + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k.startswith(("select/", "reward_mean")))
                    + "); the policy rarely reaches the selection's bar: lower rollout.select_threshold, raise "
                    "rollout.n, or start from a better model")
        metrics.update({"samples/policy": float(self.counts["policy"]),
                        "samples/reference": float(self.counts["reference"]),
                        "samples/total": float(self.counts["policy"] + self.counts["reference"]),
                        "select/empty_batches": float(self.counts["empty_batches"])})
        self.last_metrics = metrics
        return examples

    # ------------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "counts": dict(self.counts),
                "steps": [s.state_dict() if hasattr(s, "state_dict") else {} for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.counts.update(state.get("counts", {}))
        for step, s in zip(self.steps, state.get("steps", [])):
            if hasattr(step, "load_state_dict"):
                step.load_state_dict(s)
