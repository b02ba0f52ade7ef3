"""Anchored Supervised Fine-Tuning (LOSSES.md §4) and its SFT+KL ablation.

ASFT (Zhu et al. 2025, "Anchored Supervised Fine-Tuning", arXiv 2509.23753, ICLR 2026):

    ℓ_t = −sg(p_t)·s_t  +  λ · KL(π_ref(·|c_t) ‖ π_θ(·|c_t)),     s_t = log π_θ(y_t|c_t), p_t = e^{s_t}

DFT's probability-weighted cross-entropy keeps the tighter reward-weighted-regression bound, and the KL "anchor" to
the frozen initial model stops the distribution from drifting where the demonstrations say nothing. The KL is the
*forward* KL computed exactly over the full vocabulary at every completion position (teacher-forced on the
demonstration), as the reference code does (``F.kl_div(log_softmax(z_θ), softmax(z_ref)).sum(-1)``); its
logit-gradient is softmax(z_θ) − π_ref. ``sft_kl`` replaces the DFT term with plain cross-entropy −s_t (the paper's
"SFT+KL" ablation, mode ``sft+kl`` of the ASFT repository).

Memory: the trainer keeps a second full copy of the weights as π_ref (frozen, no gradients, no optimizer state) and
runs its decoder once per micro-batch under ``no_grad``; the KL is computed in chunks of ``model.chunk_tokens`` loss
positions, so at any time only a (chunk_tokens × V) fp32 logits block of *each* model (plus its log-softmax) exists,
never the (B, T, V) tensors; the policy's block is recomputed in backward (activation checkpointing).

Defaults: λ = 0.1 (``kl_weight``), the ASFT repository's training-script default (``train_v2.sh``
``KL_WEIGHT=0.1``) and LLaMA-Factory's ``asft_alpha`` argument default; the ASFT README and LLaMA-Factory's example
yaml use 0.05. Aggregation defaults to A1 (``token_mean``) like ``sft`` and ``dft`` here, so that λ = 0 is exactly
``dft`` and the loss does not depend on how an optimizer batch is cut into micro-batches. The reference code
averages per micro-batch (A2); ``aggregation: micro_token_mean`` reproduces it, and with one micro-batch per
optimizer step the two are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Loss, check
from .options import AggregationOption
from .reduce import Aggregation, masked_mean
from .registry import register


@dataclass
class AnchoredOptions(AggregationOption):
    kl_weight: float = 0.1  # λ on the full-vocabulary KL(π_ref‖π_θ) anchor (ASFT repo default; its README uses 0.05)
    aggregation: Aggregation = "token_mean"  # A1; "micro_token_mean" (A2) reproduces the ASFT repository exactly

    def validate(self) -> None:
        check(isinstance(self.kl_weight, (int, float)) and math.isfinite(self.kl_weight) and self.kl_weight >= 0,
              f"kl_weight (λ) must be a finite number >= 0, got {self.kl_weight!r}; 0 turns the anchor off")


class _Anchored(Loss):
    """A per-token fitting term plus λ·KL(π_ref‖π_θ), reduced together over the completion tokens."""

    Options = AnchoredOptions
    needs = frozenset({"ref_model"})

    def fit_term(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token fitting loss."""
        raise NotImplementedError

    def __call__(self, logprobs, batch, ctx):
        mask = batch.loss_mask
        fit = self.fit_term(logprobs)  # (B, T)
        kl = ctx.ref_kl()  # (B, T) exact Σ_v π_ref(v)[log π_ref(v) − log π_θ(v)], grad through π_θ only
        loss = ctx.reduce(fit + self.opt.kl_weight * kl, mask, self.aggregation)
        return loss, {
            "nll": masked_mean(-logprobs.detach(), mask).item(),
            "token_prob": masked_mean(logprobs.detach().exp(), mask).item(),
            "ref_kl": masked_mean(kl.detach(), mask).item(),  # logged even at λ = 0: drift from the initial model
        }


@register("asft")
class ASFT(_Anchored):
    """Anchored SFT: DFT's probability-weighted CE plus λ·KL(π_ref‖π_θ) over the full vocabulary."""

    def fit_term(self, logprobs):
        return -logprobs.detach().exp() * logprobs  # −sg(p_t)·s_t, the DFT term (losses/sft.py)


@register("sft_kl")
class SFTKL(_Anchored):
    """SFT + KL anchor (ASFT paper's ablation): CE plus λ·KL(π_ref‖π_θ) over the full vocabulary."""

    def fit_term(self, logprobs):
        return -logprobs
