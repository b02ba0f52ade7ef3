"""Proximal Supervised Fine-Tuning (LOSSES.md §5).

PSFT (Zhu et al. 2025, "Proximal Supervised Fine-Tuning", arXiv 2508.17784, ICLR 2026) reads SFT as a policy
gradient on the demonstrated tokens with constant advantage Â = 1 and applies PPO's clipped surrogate against a
snapshot π_old of the policy taken at the start of each experience batch:

    ℓ_t = −min(ρ_t, clip(ρ_t, 1−ε_low, 1+ε_high)),     ρ_t = π_θ(y_t|c_t) / π_old(y_t|c_t)

Since Â > 0 only the upper clip binds: ℓ_t = −min(ρ_t, 1+ε_high), with gradient −1[ρ_t < 1+ε_high]·ρ_t·∇s_t — an SFT
gradient weighted by the ratio and switched off on tokens that have already gained more than ε_high since the
snapshot. That trust region keeps the update small and (the paper's finding) keeps the entropy from collapsing.

The trainer fills ``old_logprobs`` for each experience batch of ``train.batch_size × minibatches`` examples, then
takes ``minibatches`` optimizer steps per pass for ``epochs`` passes (the generic experience-reuse path every
PPO-style loss uses). On the first mini-batch ρ = 1 and the gradient is SFT's. Defaults follow the reference run
(``verl/recipe/psft/run_psft.sh``: ε_low 0.2, ε_high 0.28, 64 prompts per batch in mini-batches of 8 → 8 steps per
snapshot, ``ppo_epochs`` 1) and verl's loss (log-ratio clamped to ±20 before exp, token-mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Loss, check
from .options import AggregationOption, ReuseOptions
from .pg.policy import ppo_clip
from .reduce import Aggregation, masked_mean
from .registry import register


@dataclass
class PSFTOptions(ReuseOptions, AggregationOption):
    eps_low: float = 0.2  # lower clip ε_low of ρ = π/π_old (inactive with Â = 1, kept for the PPO form)
    eps_high: float = 0.28  # upper clip ε_high: tokens with ρ > 1+ε_high get no gradient
    minibatches: int = 8  # optimizer steps per old-policy snapshot (experience batch = train.batch_size × this)
    epochs: int = 1  # passes over each experience batch (verl ppo_epochs)
    aggregation: Aggregation = "token_mean"  # A1, verl's token-mean over each optimizer (mini-)batch

    def validate(self) -> None:
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and 0.0 < v < 1.0,
                  f"{name} must lie strictly between 0 and 1 (the clip range is [1−eps_low, 1+eps_high]), got {v!r}")


@register("psft")
class PSFT(Loss):
    """Proximal SFT: PPO's clipped ratio against an old-policy snapshot, with constant advantage 1."""

    Options = PSFTOptions
    needs = frozenset({"old_logprobs"})

    def __call__(self, logprobs, batch, ctx):
        mask = batch.loss_mask
        old = batch.extras["old_logprobs"]  # (B, T) constants: π_old at the start of this experience batch
        # the PPO clipped surrogate of the RL losses (losses/pg/policy.py: log-ratio clamped to ±20 as in verl)
        term = ppo_clip(logprobs, old, torch.ones_like(logprobs), self.opt.eps_low, self.opt.eps_high)
        loss = ctx.reduce(term.loss, mask, self.aggregation)
        return loss, {
            "nll": masked_mean(-logprobs.detach(), mask).item(),
            "ratio": masked_mean(term.ratio, mask).item(),
            "clip_frac": masked_mean(term.clipped.float(), mask).item(),  # ρ > 1+ε_high: no gradient
            "ppo_kl": masked_mean(old - logprobs.detach(), mask).item(),  # k1 estimate of KL(π_old‖π_θ)
        }
