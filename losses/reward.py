"""Reward modelling: a Bradley–Terry loss on preference pairs for a model that scores whole sequences.

Bradley–Terry (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, Eq. 1), with the per-pair margin of Llama 2
(Touvron et al. 2023, arXiv 2307.09288, Eq. 2) and the centring term of Eisenstein et al. 2023 (arXiv 2312.09244,
Eq. 2), as TRL's ``RewardTrainer.compute_loss``:

    ℓ_i = −log σ(r_w − r_l − m_i) + c · (r_w + r_l)²        r = r_φ(x, y) ∈ ℝ, one score per sequence

averaged over the pairs of the optimizer batch. The model learns to score the chosen completion above the rejected
one (by at least m when the data give a ``margin`` column); c > 0 pins the scores' zero between chosen and rejected,
so a reward of 0 reads as "as good as a typical pair's midpoint" and the scale cannot drift.

The loss declares ``output = "scores"``: the trainer loads ``AutoModelForSequenceClassification(num_labels=1)`` (a
fresh score head on a causal-LM checkpoint), hands this loss the (B,) scores read at each sequence's last non-pad
token, and saves the sequence-classification model, which the ``reward_model`` reward (``rollouts/reward_model.py``)
loads by path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, check
from .registry import register


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center: float = 0.0) -> torch.Tensor:
    """(P,) per-pair loss −log σ(r_w − r_l − m) + c·(r_w + r_l)² from (P,) chosen / rejected scores."""
    per_pair = -F.logsigmoid(chosen - rejected - margin)
    if center:
        per_pair = per_pair + center * (chosen + rejected) ** 2
    return per_pair


@dataclass
class RewardOptions:
    center_rewards_coefficient: float = 0.0  # c of c·(r_w + r_l)²: keeps rewards centred on 0 (Eisenstein et al. 2023, Eq. 2; TRL recommends 0.01); 0 = off

    def validate(self) -> None:
        c = self.center_rewards_coefficient
        check(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0,
              f"center_rewards_coefficient must be a number ≥ 0 (0 turns the centring term off), got {c!r}")


@register("reward")
class RewardLoss(Loss):
    """Bradley–Terry reward model on chosen/rejected pairs (optional per-pair margin, centring term)."""

    Options = RewardOptions
    needs = frozenset({"pairs"})
    output = "scores"

    def __call__(self, scores, batch, ctx):
        if scores.dim() != 1:
            raise ValueError(f"loss '{self.name}' scores whole sequences: expected (B,) scores, got shape "
                             f"{tuple(scores.shape)} (a loss with output = 'scores' gets them from the trainer)")
        r_w, r_l = batch.pairs(scores)  # (P,), (P,)
        margin = batch.extras.get("margin")  # (B,) from the data's `margin` column, the same on both rows of a pair
        m = batch.pairs(margin.to(scores.dtype))[0] if margin is not None else 0.0
        c = self.opt.center_rewards_coefficient
        per_pair = bradley_terry_loss(r_w, r_l, m, c)  # (P,)
        loss = ctx.sequence_mean(per_pair, rows_per_item=2)  # mean over the optimizer batch's pairs
        r_w, r_l = r_w.detach(), r_l.detach()
        metrics = {
            "rewards/chosen": r_w.mean().item(),
            "rewards/rejected": r_l.mean().item(),
            "rewards/margins": (r_w - r_l).mean().item(),
            "rewards/accuracy": (r_w > r_l).float().mean().item(),  # pairwise accuracy (ties count as wrong)
            "rewards/mean": torch.cat([r_w, r_l]).mean().item(),
        }
        if c:
            metrics["center_term"] = (c * (r_w + r_l) ** 2).mean().item()
        return loss, metrics
