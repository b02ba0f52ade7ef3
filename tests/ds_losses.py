"""Tiny losses for the multi-process tests, needing what DPO / PSFT-style losses need from the trainer.

Loaded by name (``loss: {name: "ds_losses:RefKLPenalty"}``) in the pytest process and in the torchrun workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losses.base import Loss
from losses.reduce import masked_mean


@dataclass
class BetaOptions:
    beta: float = 0.5  # weight of the penalty
    epochs: int = 1  # passes over each experience batch


class RefKLPenalty(Loss):
    """SFT plus β · k3, the unbiased non-negative estimator of KL(π_θ ‖ π_ref) per sampled token (Schulman 2020):
    k3 = r − log r − 1 with log r = log π_ref − log π_θ. Needs ``ref_logprobs``."""

    Options = BetaOptions
    needs = frozenset({"ref_logprobs"})

    def __call__(self, logprobs, batch, ctx):
        log_r = batch.extras["ref_logprobs"] - logprobs  # (B, T)
        k3 = log_r.exp() - log_r - 1
        loss = ctx.reduce(-logprobs + self.opt.beta * k3, batch.loss_mask)
        return loss, {"k3": masked_mean(k3.detach(), batch.loss_mask).item()}


@dataclass
class RatioOptions:
    clip: float = 0.2  # ε of the clipped ratio
    epochs: int = 2  # passes over each experience batch: the second one sees π_θ ≠ π_old


class ClippedRatio(Loss):
    """PSFT-like: −min(ρ_t, clip(ρ_t, 1 − ε, 1 + ε)) with ρ_t = π_θ(y_t) / π_old(y_t), advantage 1 on every
    demonstration token (a PPO surrogate on SFT data). Needs ``old_logprobs``."""

    Options = RatioOptions
    needs = frozenset({"old_logprobs"})

    def __call__(self, logprobs, batch, ctx):
        ratio = (logprobs - batch.extras["old_logprobs"]).exp()  # (B, T)
        eps = self.opt.clip
        per_token = -torch.minimum(ratio, ratio.clamp(1 - eps, 1 + eps))
        loss = ctx.reduce(per_token, batch.loss_mask)
        return loss, {"ratio": masked_mean(ratio.detach(), batch.loss_mask).item()}


class FullVocabKL(Loss):
    """SFT plus β · KL(π_ref ‖ π_θ) over the whole vocabulary at every trained position (``ctx.ref_kl()``, the
    ASFT-style anchor). Needs ``ref_model``."""

    Options = BetaOptions
    needs = frozenset({"ref_model"})

    def __call__(self, logprobs, batch, ctx):
        kl = ctx.ref_kl()  # (B, T)
        loss = ctx.reduce(-logprobs + self.opt.beta * kl, batch.loss_mask)
        return loss, {"kl": masked_mean(kl.detach(), batch.loss_mask).item()}


@dataclass
class NaNOptions:
    row: int = 0  # dataset row whose micro-batch gets a NaN loss
    at_step: int = 1  # ... at this optimizer step (0-based: steps taken so far)


class NaNOnOneRow(Loss):
    """SFT whose loss is NaN (a constant added to the graph: the gradient itself stays finite) for the micro-batch
    holding one dataset row at one step, so only the rank that holds that row sees it."""

    Options = NaNOptions

    def __call__(self, logprobs, batch, ctx):
        loss = ctx.reduce(-logprobs, batch.loss_mask)
        if ctx.step == self.opt.at_step and bool((batch.extras["index"] == self.opt.row).any()):
            loss = loss + float("nan")
        return loss, {}
