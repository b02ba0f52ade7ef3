"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024, arXiv 2405.14734).

Eq. 6 of the paper:

    L = −log σ( (β/|y_w|) log π_θ(y_w|x) − (β/|y_l|) log π_θ(y_l|x) − γ )

The implicit reward is the length-normalised log-likelihood of the policy itself, so no reference model is needed,
and the target margin γ asks the chosen completion to win by a clear gap. Written as the SimPO repository does
(``scripts/simpo_trainer.py::simpo_loss``): logits = avg_logp_w − avg_logp_l − γ/β, loss −log σ(β·logits), with
label smoothing ε as cDPO. ``sft_weight`` adds λ·NLL of the chosen completion (the repo's ``sft_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Loss, check
from .dpo import check_beta, check_label_smoothing
from .pairs import pair_logps, reward_metrics
from .registry import register


@dataclass
class SimPOOptions:
    beta: float = 2.0  # β: reward scale (SimPO repo default 2.0; the README suggests 2–10)
    gamma_beta_ratio: float = 0.25  # γ/β: target reward margin over β (repo default 0.25; README: start at 0.5)
    label_smoothing: float = 0.0  # ε in [0, 0.5): assumed label-flip rate (cDPO-style smoothing)
    sft_weight: float = 0.0  # λ ≥ 0: adds λ × mean per-token NLL of the chosen completion

    def validate(self) -> None:
        check_beta(self.beta)
        check(self.gamma_beta_ratio >= 0, f"gamma_beta_ratio must be ≥ 0 (γ/β, a target margin), got {self.gamma_beta_ratio}")
        check_label_smoothing(self.label_smoothing)
        check(self.sft_weight >= 0, f"sft_weight must be ≥ 0, got {self.sft_weight}")


@register("simpo")
class SimPO(Loss):
    """SimPO (Meng et al. 2024): reference-free, length-normalised rewards with a target margin γ."""

    Options = SimPOOptions
    needs = frozenset({"pairs"})

    def __call__(self, logprobs, batch, ctx):
        o = self.opt
        policy = pair_logps(logprobs, batch, self.name)
        avg_w, avg_l = policy.chosen_mean, policy.rejected_mean  # (P,) per-token mean log-probs
        logits = avg_w - avg_l - o.gamma_beta_ratio  # Eq. 6 divided by β
        per_pair = (1 - o.label_smoothing) * F.softplus(-o.beta * logits) + o.label_smoothing * F.softplus(o.beta * logits)
        metrics = reward_metrics(o.beta * avg_w, o.beta * avg_l, policy)
        if o.sft_weight > 0:
            # mean over pairs of the chosen completion's per-token NLL; the SimPO repo token-averages over the batch's
            # chosen tokens instead (the same when chosen completions have equal lengths)
            nll = -avg_w  # (P,)
            per_pair = per_pair + o.sft_weight * nll
            metrics["sft_nll"] = nll.detach().mean().item()
        return ctx.sequence_mean(per_pair, rows_per_item=2), metrics
