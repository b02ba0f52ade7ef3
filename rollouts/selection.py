"""Which rollouts a loss trains on: the selection steps of rejection-sampling fine-tuning and online DPO.

Each step takes the ``n`` scored samples of every prompt (one group) and keeps some of them (``rollout.select``):

| name         | keeps, per prompt                                                        | trains              |
|--------------|--------------------------------------------------------------------------|---------------------|
| ``best``     | the sample with the highest reward (ties: the first drawn)              | ``sft``: BoN-SFT     |
| ``verified`` | every sample with reward ≥ ``select_threshold``, duplicates removed     | ``sft``: RFT / ReST  |
| ``best_worst`` | the pair (best, worst); a prompt whose samples all score the same is skipped (counted) | ``dpo``: online DPO |

``best`` + ``sft`` is forward-KL BOND, min KL(π_BoN‖π_θ) (LOSSES.md §7.2), iterated on the current policy's samples
(RAFT). ``verified`` is oat's ReST actor (``oat/algorithms/rft.py``: keep correct, dedupe). The selection is made
from rewards only, so it carries no gradient. Every step reports what it kept in ``metrics``.
"""

from __future__ import annotations

from .types import Example


def _groups(examples: list[Example]) -> dict[int, list[Example]]:
    out: dict[int, list[Example]] = {}
    for ex in examples:
        out.setdefault(ex.group, []).append(ex)
    return out


def _reward(ex: Example) -> float:
    return float(ex.samples[0].fields["reward"])


class BestOfGroup:
    """Keep each prompt's highest-reward sample (Best-of-n)."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def __call__(self, examples: list[Example], prompts: dict, batch: int) -> list[Example]:
        kept = [max(g, key=_reward) for g in _groups(examples).values()]  # max keeps the first of ties
        self.metrics = {"select/kept": float(len(kept)), "select/kept_frac": len(kept) / max(len(examples), 1),
                        "select/kept_reward_mean": sum(map(_reward, kept)) / max(len(kept), 1)}
        return kept

    def placeholder(self, raw: list[Example]) -> Example:
        return raw[0]


class Verified:
    """Keep every sample whose reward reaches ``threshold`` (0/1 verifiers: the correct ones), each distinct
    completion of a prompt once."""

    def __init__(self, threshold: float = 1.0):
        self.threshold = threshold
        self.metrics: dict[str, float] = {}

    def __call__(self, examples: list[Example], prompts: dict, batch: int) -> list[Example]:
        kept, duplicates, empty = [], 0, 0
        groups = _groups(examples)
        for group in groups.values():
            seen = set()
            passed = [ex for ex in group if _reward(ex) >= self.threshold]
            empty += not passed
            for ex in passed:
                key = tuple(ex.samples[0].input_ids)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                kept.append(ex)
        self.metrics = {"select/kept": float(len(kept)), "select/kept_frac": len(kept) / max(len(examples), 1),
                        "select/duplicates": float(duplicates),
                        "select/groups_without_pass": empty / max(len(groups), 1)}
        return kept

    def placeholder(self, raw: list[Example]) -> Example:
        return raw[0]


class BestWorstPairs:
    """Pair each prompt's best and worst sample as (chosen, rejected); skip prompts whose samples tie."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def __call__(self, examples: list[Example], prompts: dict, batch: int) -> list[Example]:
        pairs, tied = [], 0
        groups = _groups(examples)
        for g, group in groups.items():
            best, worst = max(group, key=_reward), min(group, key=_reward)
            if _reward(best) == _reward(worst):
                tied += 1  # no preference to learn (all right, all wrong, or one sample)
                continue
            pairs.append(Example(samples=[best.samples[0], worst.samples[0]], index=best.index, group=g))
        self.metrics = {"select/pairs": float(len(pairs)), "select/tied_groups": float(tied),
                        "select/tied_frac": tied / max(len(groups), 1)}
        if pairs:
            margin = sum(float(p.samples[0].fields["reward"]) - float(p.samples[1].fields["reward"]) for p in pairs)
            self.metrics["select/reward_margin"] = margin / len(pairs)
        return pairs

    def placeholder(self, raw: list[Example]) -> Example:
        return Example(samples=[raw[0].samples[0], raw[0].samples[0]], index=raw[0].index, group=raw[0].group)


SELECTORS = {"best": BestOfGroup, "verified": Verified, "best_worst": BestWorstPairs}
PAIR_SELECTORS = ("best_worst",)  # selections whose examples are preference pairs


def build_selector(name: str, threshold: float = 1.0):
    if name not in SELECTORS:
        raise ValueError(f"unknown rollout.select {name!r}; choose one of all, {', '.join(SELECTORS)}")
    return Verified(threshold) if name == "verified" else SELECTORS[name]()
