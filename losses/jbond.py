"""J-BOND: the Jeffreys-divergence BOND of Sessa et al. 2024 (arXiv 2407.14622, §5), against a moving anchor.

n = 2 samples of a moving anchor π_anc per prompt and one (or more) policy samples. Forward term: NLL of the better
anchor sample (Best-of-2 SFT, mode covering); backward term: REINFORCE on the policy sample with the
crude reward ``worse_reward`` (−log 16) if it is worse than both anchor samples, else 0, and KL(π_θ ‖ π_anc) with
coefficient 1/(n−1) in the reward; anchor moved by EMA after every optimizer step. Mixed as
(1−β_J)·forward + β_J·backward (+ ``anchor_kl``·KL(π_θ‖π_anc) in the loss).

The anchor is the loss's reference policy, declared through attributes the trainer reads (``losses/base.py``):
``reference_ema`` = γ > 0 makes the reference a moving EMA copy of the policy, and ``reference_samples`` = n is how
many anchor samples per prompt the rollout side draws and ranks against (``needs``: ``reference_rewards``,
``reference_best``). The quantile counts come from ``losses/bon.py``; the backward term is ``losses/pg``'s REINFORCE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Loss, check
from .batch import Batch
from .bon import reference_counts
from .options import AggregationOption
from .pg import policy as pg
from .pg.advantages import ESTIMATORS
from .pg.kl import LOSS_KL, k1, k3
from .pg.objective import REWARD_KEY
from .registry import register

JBONDAdvantage = Literal["batch_mean", "group_mean", "rloo"]
JBONDAggregation = Literal["seq_mean_token_sum", "seq_mean_token_mean"]


@dataclass
class JBONDOptions(AggregationOption):
    jeffreys_beta: float = 0.5  # β_J of (1−β_J)·forward KL (BoN-SFT) + β_J·backward KL (PG); 0.5 as LOSSES.md reports the paper's runs [VERIFY]
    reference_samples: int = 2  # n: anchor samples per prompt; the target is Best-of-n of the anchor (J-BOND: 2)
    reference_ema: float = 0.02  # γ: anchor ← (1−γ)·anchor + γ·θ after every optimizer step (our choice, see README)
    worse_reward: float = -math.log(16)  # reward of a policy sample worse than every anchor sample, else 0; −log 16: our reading of BOND §5 [VERIFY]
    anchor_kl: float = 0.0  # extra weight of KL(π_θ‖π_anc) as k2 in the loss (J-BOND's G_Reg; 0 = off, our choice)
    advantage: JBONDAdvantage = "batch_mean"  # baseline of the backward term: one policy sample per prompt → batch (our choice)
    aggregation: JBONDAggregation = "seq_mean_token_sum"  # per-sequence sum (A4, the papers') or token mean (A3)

    def validate(self) -> None:
        check(0.0 <= self.jeffreys_beta <= 1.0, f"jeffreys_beta must lie in [0, 1], got {self.jeffreys_beta}")
        check(isinstance(self.reference_samples, int) and self.reference_samples >= 2,
              f"reference_samples (anchor samples per prompt, the n of Best-of-n) must be ≥ 2, got "
              f"{self.reference_samples!r}")
        check(0.0 < self.reference_ema <= 1.0, f"reference_ema (the anchor's EMA rate γ) must lie in (0, 1], got "
              f"{self.reference_ema}")
        check(math.isfinite(self.worse_reward) and self.worse_reward <= 0,
              f"worse_reward must be a finite number ≤ 0, got {self.worse_reward}")
        check(self.anchor_kl >= 0, f"anchor_kl must be ≥ 0, got {self.anchor_kl}")


@register("jbond")
class JBOND(Loss):
    """J-BOND (Sessa et al. 2024, §5): Jeffreys mix of Best-of-n SFT and quantile-reward PG against an EMA anchor.

    ℓ = (1−β_J)·mean_prompts[−log π_θ(best anchor sample)] + β_J·mean_policy[−Â·log π_θ(y)]
        (+ anchor_kl · mean_policy[Σ_t k2(s_t, s_t^anc)]),
    Â = R' − baseline, R' = r_J(y) − (1/(n−1))·Σ_t (s^old_t − s^anc_t), r_J = ``worse_reward`` if r(y) < min_j r(y'_j).
    """

    Options = JBONDOptions
    needs = frozenset({"rewards", "reference_rewards", "reference_best", "old_logprobs", "ref_logprobs"})

    def prepare(self, batch: Batch, ctx) -> Batch:
        """Row weights (B,), the backward term's Â (B, T), the crude reward r_J (B,); all constants."""
        opt = self.opt
        anchor = _reference_rows(batch, self.name)  # (B,) bool: the best anchor sample of each prompt
        policy = ~anchor
        n_anchor, n_policy = int(anchor.sum()), int(policy.sum())
        below, equal, count = reference_counts(batch, self.name)
        worse = (below + equal == 0) & policy  # worse than every anchor sample
        r_j = torch.where(worse, torch.full_like(below, opt.worse_reward), torch.zeros_like(below)).float()
        mask = batch.loss_mask
        rows = policy.nonzero().flatten()
        adv = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        if len(rows):
            pmask = mask[rows]
            # KL(π_θ‖π_anc) with coefficient 1/(n−1) in the reward: Σ_t k1(s_old, s_anc) per sequence
            penalty = k1(batch.extras["old_logprobs"][rows], batch.extras["ref_logprobs"][rows]).float() \
                / (opt.reference_samples - 1)
            groups = None if batch.group_ids is None else batch.group_ids[rows]
            adv[rows] = ESTIMATORS[opt.advantage](r_j[rows], groups, pmask, penalty, 0.0).float()
        total = len(batch)
        weight = torch.where(anchor, torch.full_like(r_j, total / max(n_anchor, 1)),
                             torch.full_like(r_j, total / max(n_policy, 1)))  # 1/share of the row's kind
        extras = {**batch.extras, "advantages": adv, "jbond_reward": r_j, "row_weight": weight,
                  "policy_row": policy.float()}
        return dataclasses.replace(batch, extras=extras)

    def __call__(self, logprobs, batch, ctx):
        opt = self.opt
        if "row_weight" not in batch.extras:
            raise RuntimeError(f"loss '{self.name}': call loss.prepare(batch, ctx) on the experience batch first")
        mask = batch.loss_mask
        policy = batch.extras["policy_row"] > 0.5  # (B,)
        anchor = ~policy
        weight = batch.extras["row_weight"]
        adv, ref = batch.extras["advantages"], batch.extras["ref_logprobs"]
        nll = -logprobs  # (B, T) forward term: Best-of-n SFT on the anchor rows
        term = pg.reinforce(logprobs, batch.extras["old_logprobs"], adv)  # −Â·s_t on the policy rows
        backward = opt.jeffreys_beta * term.loss
        if opt.anchor_kl > 0:
            backward = backward + opt.anchor_kl * LOSS_KL["k2"](logprobs, ref)
        per_token = torch.where(anchor[:, None], (1 - opt.jeffreys_beta) * nll, backward)
        per_row = _sequence_values(per_token, mask, opt.aggregation)  # (B,)
        loss = ctx.sequence_mean(weight * per_row)

        with torch.no_grad():
            rows = max(len(batch), 1)
            token_nll = _sequence_values(nll.detach(), mask, "seq_mean_token_mean")  # (B,)
            kl_anc = _sequence_values(k3(logprobs.detach(), ref), mask, "seq_mean_token_mean")
            share = weight / rows  # Σ_rows share·v over micro-batches, weighted by rows = the mean over the kind

            def mean_over(kind, values):
                return float((share * values * kind).sum())

            metrics = {
                "nll_forward": mean_over(anchor, token_nll),  # per-token NLL of the best anchor samples
                "nll_policy": mean_over(policy, token_nll),
                "kl_anchor": mean_over(policy, kl_anc),  # k3 estimate of KL(π_θ‖π_anc) per token, policy samples
                "worse_frac": mean_over(policy, (batch.extras["jbond_reward"] < 0).double()),
                "reward_mean": mean_over(policy, batch.extras[REWARD_KEY].double()),
                "anchor_best_reward_mean": mean_over(anchor, batch.extras[REWARD_KEY].double()),
                "pg_loss": mean_over(policy, _sequence_values(term.loss.detach(), mask, opt.aggregation)),
            }
        return loss, metrics


def _reference_rows(batch: Batch, loss_name: str) -> torch.Tensor:
    flag = batch.extras.get("reference_sample")
    if flag is None:
        raise ValueError(f"loss '{loss_name}' needs the best reference (anchor) sample of each prompt as a row flagged "
                         "batch.extras['reference_sample'] = 1 (needs 'reference_best', filled in a `rollout:` run)")
    return flag > 0.5


def _sequence_values(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(B,) Σ_t m ℓ (seq_mean_token_sum) or Σ_t m ℓ / Σ_t m (seq_mean_token_mean)."""
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(1)
    if aggregation == "seq_mean_token_mean":
        return total / mask.sum(1).clamp(min=1)
    return total
