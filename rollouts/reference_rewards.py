"""How each rollout ranks among samples of the reference policy for the same prompt (BOND, vBoN, J-BOND).

For every prompt of a batch, ``k`` completions are sampled from a *reference* engine (π_ref, or J-BOND's moving
anchor) with the rollout's sampling settings and scored with the rollout's reward functions. Each rollout sample
then gets three per-sequence fields, the only thing the losses read (``losses/bon.py`` turns them into p̂_≤, F̂, …):

    ref_below = #{j : r(y'_j) < r(y)},   ref_equal = #{j : r(y'_j) = r(y)},   ref_count = k

Ties are counted, not broken: the losses decide what a tie means.

Fixed reference (``cache=True``): the samples are i.i.d. from π_ref whenever they are drawn, so each prompt is sampled
once, the first time it appears, and its k rewards are kept (k floats per prompt, saved with the checkpoint; nothing
else is kept). Cost: k generations per *distinct* prompt — k × (prompts seen) in one epoch, nothing more in later
epochs — on the reference engine, which is transformers ``generate`` on the frozen reference model the trainer
already holds for the KL term (no second copy of the weights). Moving anchor (``cache=False``): fresh samples every
batch (k per prompt per batch), since the anchor changes after every step.

``add_best``: the best of the k reference samples of each prompt (ties: the first) also becomes a training row,
flagged ``reference_sample = 1`` (J-BOND's forward term: Best-of-k SFT on the anchor's samples).
"""

from __future__ import annotations

import time
from dataclasses import replace

from .engine import SamplingParams
from .rollout_source import completion_sample, score_completions
from .scoring import Scorer
from .types import Example


def rank_counts(reward: float, reference: list[float]) -> tuple[int, int]:
    """(#{r_j < r}, #{r_j = r}) of one reward against its prompt's reference rewards."""
    return sum(1 for x in reference if x < reward), sum(1 for x in reference if x == reward)


class ReferenceRewards:
    """A rollout step (rollouts/processed_source.py): attach reference-rank counts, optionally add the best sample."""

    def __init__(self, engine, scorer: Scorer, sampling: SamplingParams, k: int, *, cache: bool = True,
                 add_best: bool = False, seed: int = 0, rank: int = 0):
        if k < 1:
            raise ValueError(f"reference samples per prompt must be at least 1, got {k}")
        if add_best and cache:
            raise ValueError("add_best needs fresh reference samples every batch (cache=False): the cache keeps rewards "
                             "only, not the sequences")
        self.engine = engine
        self.scorer = scorer
        self.sampling = sampling
        self.k = k
        self.cache = cache
        self.add_best = add_best
        self.seed = seed
        self.rank = rank
        self.rewards: dict[int, list[float]] = {}  # prompt index → its k reference rewards (cache=True)
        self.metrics: dict[str, float] = {}

    def __call__(self, examples: list[Example], prompts: dict, batch: int) -> list[Example]:
        """``prompts``: group id → prompt (``.prompt_ids``, ``.index``, ``.fields``) of every group in ``examples``."""
        t0 = time.perf_counter()
        groups = list(dict.fromkeys(ex.group for ex in examples))
        todo = [g for g in groups if not (self.cache and prompts[g].index in self.rewards)]
        fresh: dict[int, list] = {}  # group → [(completion, reward)] drawn now
        if todo:
            seed = None if self.sampling.seed is None else hash((self.seed, batch, self.rank, 7919)) % (1 << 31)
            comps = self.engine.generate([prompts[g].prompt_ids for g in todo], replace(self.sampling, seed=seed),
                                         n=self.k)
            rows = [prompts[todo[c.prompt_index]] for c in comps]
            scores = score_completions(self.scorer, rows, comps)
            for c, r in zip(comps, scores.total):
                fresh.setdefault(todo[c.prompt_index], []).append((c, float(r)))
        reference = {g: [r for _, r in fresh[g]] if g in fresh else self.rewards[prompts[g].index] for g in groups}
        if self.cache:
            for g in todo:
                self.rewards[prompts[g].index] = reference[g]

        out = []
        for ex in examples:
            for s in ex.samples:
                below, equal = rank_counts(float(s.fields["reward"]), reference[ex.group])
                s.fields.update(ref_below=float(below), ref_equal=float(equal), ref_count=float(self.k))
            out.append(ex)
        if self.add_best:
            out.extend(self._best_rows(groups, prompts, fresh, reference))
        generated = [r for g in todo for _, r in fresh[g]]
        self.metrics = {
            "reference/samples": float(len(generated)),  # generated this batch (the sampling cost)
            "reference/prompts_cached": float(len(self.rewards)),
            "reference/time": time.perf_counter() - t0,
        }
        if generated:
            self.metrics["reference/reward_mean"] = sum(generated) / len(generated)
        return out

    def _best_rows(self, groups, prompts, fresh, reference) -> list[Example]:
        rows = []
        for g in groups:
            comp, reward = max(fresh[g], key=lambda cr: cr[1])  # ties: the first drawn
            sample = completion_sample(comp, reward)
            below, equal = rank_counts(reward, reference[g])
            sample.fields.update(ref_below=float(below), ref_equal=float(equal), ref_count=float(self.k),
                                 reference_sample=1.0)
            rows.append(Example(samples=[sample], index=prompts[g].index, group=g))
        return rows

    # ------------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"rewards": {str(i): r for i, r in self.rewards.items()}} if self.cache else {}

    def load_state_dict(self, state: dict) -> None:
        self.rewards = {int(i): list(r) for i, r in state.get("rewards", {}).items()}
