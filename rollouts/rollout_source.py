"""Online experience: prompts → ``n`` samples each from an engine → rewards → groups of examples.

Each call to :meth:`RolloutSource.next_batch` takes the next prompts (seeded order, reshuffled every epoch, like
``DatasetSource``), samples ``n`` completions of each with the engine, scores them, and returns one
:class:`Example` per completion; the ``n`` completions of a prompt share ``Example.group`` (the unit of group
advantages and best-of-N). Every :class:`Sample` carries, in ``fields``:

- ``reward``: the weighted total reward of the sequence (``batch.extras["reward"]``, (B,), what a loss declaring
  ``needs={"rewards"}`` reads; per-term values are in the JSONL);
- ``engine_logprobs``: the engine's raw-distribution log-prob of each token, aligned to ``input_ids`` (0 on the
  prompt), for the engine-vs-trainer mismatch and truncated importance sampling;
- ``weight_version``: the engine weight version the sample was drawn with.

Every sample and its rewards go to a JSONL file (one object per line) a user can read while training runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .engine import SamplingParams
from .scoring import Scorer
from .sources import DatasetSource
from .types import Example, Sample

log = logging.getLogger("rollouts")


@dataclass
class PromptItem:
    """A prompt to roll out (plain data; ``align.data.PromptRow`` has the same attributes and is accepted as is)."""

    prompt_ids: list[int]
    prompt_text: str
    fields: dict[str, Any] = field(default_factory=dict)  # the row's other columns (``answer``, ...) for rewards
    index: int = -1  # row of the prompt file
    prompt_messages: list | None = None  # the chat messages, when the prompt was a conversation


class RolloutSource:
    online = True  # the trainer pushes weights to the engine after updates
    provides = frozenset({"reward", "engine_logprobs", "weight_version"})

    def __init__(self, prompts: list, engine, scorer: Scorer, sampling: SamplingParams, n: int, batch_size: int,
                 seed: int = 0, seeded: bool = True, shuffle: bool = True, samples_path: str | None = None,
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError(f"rollout.n (samples per prompt) must be at least 1, got {n}")
        for attr in ("prompt_ids", "prompt_text", "fields", "index"):
            if prompts and not hasattr(prompts[0], attr):
                raise TypeError(f"prompts must have .{attr} (see rollouts.rollout_source.PromptItem)")
        self.prompts = DatasetSource(list(prompts), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                     world_size=world_size)
        self.engine = engine
        self.scorer = scorer
        self.sampling = sampling
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.seeded = seeded  # each batch sampled with a seed derived from (seed, batch, rank): reproducible
        self.samples_path = samples_path
        self.batches = 0  # experience batches made so far (seeds the sampling, numbers the JSONL records)
        self.last_metrics: dict[str, float] = {}
        self.last_prompts: dict[int, Any] = {}  # group id → prompt of the last batch

    def __len__(self) -> int:
        return len(self.prompts)

    def next_batch(self, size: int | None = None) -> list[Example]:
        """``size`` prompts (default batch_size) of the global batch, this rank's share, ``n`` examples each."""
        if self.prompts.position >= len(self.prompts):
            start = (self.prompts.epoch + 1) * len(self.prompts)
        else:
            start = self.prompts.epoch * len(self.prompts) + self.prompts.position
        prompts = self.prompts.next_batch(size)
        rank, world = self.prompts.rank, self.prompts.world_size
        seed = hash((self.seed, self.batches, rank)) % (1 << 31) if self.seeded else None
        sampling = replace(self.sampling, seed=seed)
        t0 = time.perf_counter()
        comps = self.engine.generate([p.prompt_ids for p in prompts], sampling, n=self.n)
        t1 = time.perf_counter()
        rows = [prompts[c.prompt_index] for c in comps]
        scores = score_completions(self.scorer, rows, comps)
        t2 = time.perf_counter()

        examples = []
        for k, (c, r) in enumerate(zip(comps, rows)):
            sample = completion_sample(c, scores.total[k])
            # group = the prompt's position in the global stream (this rank serves positions rank, rank + world, ...)
            examples.append(Example(samples=[sample], index=r.index, group=start + rank + world * c.prompt_index))
        # the prompt of every group, for steps that act per prompt (rollouts/processed_source.py)
        self.last_prompts = {start + rank + world * i: p for i, p in enumerate(prompts)}
        self._write(comps, rows, scores)
        self.last_metrics = self._metrics(comps, scores, t1 - t0, t2 - t1)
        self.batches += 1
        return examples

    # ------------------------------------------------------------------------------------------------ logging
    def _metrics(self, comps, scores, gen_s: float, reward_s: float) -> dict[str, float]:
        total = scores.total
        mean = sum(total) / len(total)
        out = {"reward_mean": mean, "reward_std": math.sqrt(sum((x - mean) ** 2 for x in total) / len(total))}
        for name, vals in scores.terms.items():
            out[f"reward/{name}"] = sum(vals) / len(vals)
        for name, count in self.scorer.failures.items():
            if count:
                out[f"reward/{name}/failures"] = float(count)
        groups: dict[int, list[float]] = {}
        for c, r in zip(comps, total):
            groups.setdefault(c.prompt_index, []).append(r)
        out["groups_all_same_reward"] = sum(len(set(g)) == 1 for g in groups.values()) / len(groups)
        out["completion_length"] = sum(len(c.token_ids) for c in comps) / len(comps)
        out["completion_stopped"] = sum(c.finish_reason == "stop" for c in comps) / len(comps)
        out["rollout_time"] = gen_s
        out["reward_time"] = reward_s
        out["rollout_tokens_per_s"] = sum(len(c.token_ids) for c in comps) / max(gen_s, 1e-9)
        return out

    def _write(self, comps, rows, scores) -> None:
        if not self.samples_path:
            return
        os.makedirs(os.path.dirname(self.samples_path) or ".", exist_ok=True)
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for k, (c, r) in enumerate(zip(comps, rows)):
                rec = {"batch": self.batches, "prompt_index": r.index, "weight_version": c.weight_version,
                       "prompt": r.prompt_text, "completion": c.text, "finish_reason": c.finish_reason,
                       "tokens": len(c.token_ids), "reward": scores.total[k],
                       "rewards": {name: vals[k] for name, vals in scores.terms.items()}}
                if any(k in bad for bad in scores.defaulted.values()):
                    rec["defaulted"] = sorted(name for name, bad in scores.defaulted.items() if k in bad)
                rec.update({key: v for key, v in r.fields.items() if key not in rec and _plain(v)})
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.batches = int(state["batches"])
        self._truncate_samples()

    def _truncate_samples(self) -> None:
        """Drop JSONL records of batches made after the checkpoint we resume from (a crashed run wrote them)."""
        if not self.samples_path or not os.path.exists(self.samples_path):
            return
        keep = []
        with open(self.samples_path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("batch", 0) < self.batches:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue
        tmp = self.samples_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.samples_path)


def completion_sample(c, reward: float) -> Sample:
    """A completion as a trainable sample: prompt + completion ids, loss on the completion, and its fields."""
    P, L = len(c.prompt_ids), len(c.token_ids)
    return Sample(
        input_ids=list(c.prompt_ids) + list(c.token_ids),
        loss_mask=[False] * P + [True] * L,
        fields={"reward": reward, "engine_logprobs": [0.0] * P + list(c.logprobs),
                "weight_version": float(c.weight_version)},
    )


def score_completions(scorer: Scorer, rows: list, comps: list):
    """Score each completion against its prompt row (``rows[i]`` is the prompt of ``comps[i]``): the reward
    functions see the prompt text, the completion text and the row's other columns (+ ``prompt_messages``)."""
    fields = []
    for r in rows:
        f = dict(r.fields)
        messages = getattr(r, "prompt_messages", None)
        if messages is not None:
            f["prompt_messages"] = messages
        fields.append(f)
    return scorer([r.prompt_text for r in rows], [c.text for c in comps], fields)


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))
