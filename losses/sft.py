"""Supervised fine-tuning and Dynamic Fine-Tuning (LOSSES.md §1 and §3).

SFT:  ℓ_t = −s_t                       with s_t = log π_θ(y_t | c_t) on completion tokens
DFT:  ℓ_t = −sg(p_t) · s_t,  p_t = e^{s_t}   (Wu et al. 2025, arXiv 2508.05629: the SFT gradient rescaled per
      token by the model's own probability, which removes the 1/π implicit-reward blow-up on improbable tokens;
      d ℓ_t / d s_t = −p_t.)

Both reduce with the shared aggregation (default A1, token-mean over the optimizer batch: the TRL convention,
independent of gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Loss
from .options import AggregationOption
from .reduce import masked_mean
from .registry import register


@dataclass
class SFTOptions(AggregationOption):
    """SFT's one option, ``aggregation`` (A1 token-mean by default)."""


@register("sft")
class SFT(Loss):
    """Token-level cross-entropy on completion / assistant tokens."""

    Options = SFTOptions

    def __call__(self, logprobs, batch, ctx):
        nll = -logprobs  # (B, T)
        loss = ctx.reduce(nll, batch.loss_mask, self.aggregation)
        return loss, {"nll": masked_mean(nll.detach(), batch.loss_mask).item()}


@register("dft")
class DFT(SFT):
    """Dynamic Fine-Tuning: SFT with each token's loss weighted by its detached probability."""

    def __call__(self, logprobs, batch, ctx):
        weight = logprobs.detach().exp()  # sg(p_t), (B, T)
        per_token = -weight * logprobs
        loss = ctx.reduce(per_token, batch.loss_mask, self.aggregation)
        mask = batch.loss_mask
        return loss, {
            "nll": masked_mean(-logprobs.detach(), mask).item(),  # the plain CE, logged by the DFT repo as original_loss
            "token_prob": masked_mean(weight, mask).item(),
        }
