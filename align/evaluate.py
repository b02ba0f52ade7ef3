"""Generation-based evaluation: sample on held-out prompts, score with reward functions, report accuracy.

``accuracy`` is the mean of the first reward over all samples (pass@1 for a 0/1 verifier); ``reward`` the mean of
the weighted sum of all reward terms, ``reward/NAME`` each term's mean. When the first term is a 0/1 verifier, a
real-valued term (a learned reward model, centred on 0) also gets ``reward/NAME>0`` (the fraction of samples it scores
above 0: those it calls right) and ``gap/NAME`` = that fraction − ``accuracy`` (how much it over-rates the samples:
reward hacking made visible). For 0/1 rewards with
n samples per prompt, pass@k uses the unbiased estimator 1 − C(n−c, k) / C(n, k) (Chen et al. 2021).
"""

from __future__ import annotations

import json
import math
import os

from rollouts.engine import SamplingParams
from rollouts.rewards import load_reward
from rollouts.scoring import RewardTerm, Scorer

from .config import EvalConfig, RewardSpec
from .data import PromptRow


def build_rewards(specs: list[RewardSpec]) -> list[RewardTerm]:
    return [RewardTerm(s.name, load_reward(s.name, s.options), s.weight) for s in specs]


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(rewards: list[RewardTerm], prompts: list[str], completions: list[str], fields: list[dict]):
    """Each reward's values and their weighted sum (rollouts/scoring.py: a failing or hanging reward raises, naming
    the sample)."""
    return Scorer(rewards)(prompts, completions, fields)


def evaluate(engine, prompts: list[PromptRow], cfg: EvalConfig, rewards: list[RewardTerm], seed: int = 0,
             samples_path: str | None = None, completions_out: list | None = None) -> dict[str, float]:
    """Metrics of ``engine``'s samples on ``prompts``; the completions are appended to ``completions_out``."""
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
    comps = engine.generate([p.prompt_ids for p in prompts], sampling, n=cfg.n)
    if completions_out is not None:
        completions_out.extend(comps)
    rows = [prompts[c.prompt_index] for c in comps]
    # a chat prompt's messages go along (as in rollouts): a learned reward renders them with its own chat template
    fields = [r.fields if r.prompt_messages is None else {**r.fields, "prompt_messages": r.prompt_messages}
              for r in rows]
    scored = score(rewards, [r.prompt_text for r in rows], [c.text for c in comps], fields)
    scores = scored.terms
    first = next(iter(scores))
    metrics = {"accuracy": sum(scores[first]) / len(comps)}
    for name, vals in scores.items():
        metrics[f"reward/{name}"] = sum(vals) / len(vals)
    metrics["reward"] = sum(scored.total) / len(comps)  # mean of Σ_k weight_k · r_k
    metrics["mean_length"] = sum(len(c.token_ids) for c in comps) / len(comps)
    metrics["stopped"] = sum(c.finish_reason == "stop" for c in comps) / len(comps)
    binary = all(v in (0.0, 1.0) for v in scores[first])
    for name, vals in list(scores.items())[1:]:
        if binary and not all(v in (0.0, 1.0) for v in vals):
            # a real-valued term next to a 0/1 verifier (a learned, centred reward model): how often it calls a sample
            # good (> 0), and by how much that exceeds the verified accuracy (> 0: the reward is being fooled)
            metrics[f"reward/{name}>0"] = sum(v > 0 for v in vals) / len(vals)
            metrics[f"gap/{name}"] = metrics[f"reward/{name}>0"] - metrics["accuracy"]
    if binary:
        per_prompt: dict[int, list[float]] = {}
        for c, v in zip(comps, scores[first]):
            per_prompt.setdefault(c.prompt_index, []).append(v)
        for k in sorted({1, cfg.n}):
            metrics[f"pass@{k}"] = sum(pass_at_k(len(v), int(sum(v)), k) for v in per_prompt.values()) / len(per_prompt)
    if samples_path:
        os.makedirs(os.path.dirname(samples_path) or ".", exist_ok=True)
        with open(samples_path, "w", encoding="utf-8") as f:
            for i, (c, r) in enumerate(zip(comps, rows)):
                rec = {"prompt": r.prompt_text, "completion": c.text, "finish_reason": c.finish_reason,
                       **{name: vals[i] for name, vals in scores.items()}, **_plain(r.fields)}
                f.write(json.dumps(rec) + "\n")
    return metrics


def _plain(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if isinstance(v, (str, int, float, bool)) or v is None}
