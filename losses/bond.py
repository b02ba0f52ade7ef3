"""Best-of-N distillation by policy gradient: BOND, vBoN and J-BOND (LOSSES.md §7.3, §7.4).

BOND (Sessa et al. 2024, arXiv 2407.14622, ICLR 2025): make π_θ sample what Best-of-N of π_ref would, with one
sample. The backward KL to the BoN distribution (§7.1) is, up to a constant,

    KL(π_θ ‖ π_BoN) = KL(π_θ ‖ π_ref) − E_{y~π_θ}[ log π_BoN(y)/π_ref(y) ]
                    = (N−1) · ( β·KL(π_θ ‖ π_ref) − E_{π_θ}[ r_BOND(y) ] ),   β = 1/(N−1),

i.e. KL-regularised RL with the *quantile reward* r_BOND = log(π_BoN/π_ref)/(N−1) = log p_≤ + log T/(N−1)
(T = the tie correction of §7.1; ≈ log p_≤ + const without ties). Intuition: the reward is how the sample ranks among
π_ref's samples for that prompt, so any monotone transform of the reward model gives the same policy, and β is fixed
by N. vBoN (Amini et al. 2024, arXiv 2407.06057) is the same RL problem with the reward log F(r), F the CDF of
π_ref's rewards ("the lower bound", rycolab/vbon ``--bound l1``), N = 1/β + 1.

Both are the KL-regularised policy gradient of ``losses/pg`` (LOSSES.md §6.3) with a reward transform applied in
``prepare``: the quantile / CDF is estimated from the rollout's reference counts (``ref_below``, ``ref_equal``,
``ref_count``: how many of k samples from π_ref for the same prompt scored below / equal; ``losses/bon.py`` has the
estimators) and replaces ``extras["reward"]`` (the task reward stays in ``task_reward``). Defaults: the KL in the
reward, k1 summed over the sequence, β = 1/(N−1) (R' = r − β Σ_t (s^old − s^ref)); leave-one-out baseline;
on-policy REINFORCE −Â·s_t; sequence-level sums averaged over sequences (A4). Its expected gradient is
−∇[E r − β KL(π_θ‖π_ref)] exactly. Stop-gradients: the reward, its quantile, the baseline and the KL penalty are
constants (computed without gradient in ``prepare``); only s_t = log π_θ carries gradient.

J-BOND (BOND §5): n = 2 samples of a moving anchor π_anc per prompt and one (or more) policy samples. Forward term:
NLL of the better anchor sample (Best-of-2 SFT, mode covering); backward term: REINFORCE on the policy sample with the
crude reward ``worse_reward`` (−log 16) if it is worse than both anchor samples, else 0, and KL(π_θ ‖ π_anc) with
coefficient 1/(n−1) in the reward; anchor moved by EMA after every optimizer step. Mixed as
(1−β_J)·forward + β_J·backward (+ ``anchor_kl``·KL(π_θ‖π_anc) in the loss).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch

from .base import Loss, check
from .batch import Batch
from .bon import add_one_cdf, add_one_quantiles, bon_log_ratio
from .pg import policy as pg
from .pg.advantages import ESTIMATORS
from .pg.kl import LOSS_KL, k1, k3
from .pg.objective import KLPG, REWARD_KEY, AdvantageName, KLName, KLPGOptions, PolicyName, RewardKLName
from .reduce import Aggregation, masked_mean
from .registry import register

COUNT_KEYS = ("ref_below", "ref_equal", "ref_count")  # per-sequence extras filled by the rollout side


def reference_counts(batch: Batch, loss_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, e, k), each (B,): reference samples of the row's prompt with a lower / equal reward, and how many."""
    missing = [k for k in COUNT_KEYS if k not in batch.extras]
    if missing:
        raise ValueError(f"loss '{loss_name}' needs batch.extras {list(COUNT_KEYS)} (how the sample's reward ranks "
                         f"among reference samples of its prompt); missing {missing}. The trainer fills them for a loss "
                         "that declares needs 'reference_rewards' in a `rollout:` run")
    below, equal, count = (batch.extras[k].to(torch.float64) for k in COUNT_KEYS)
    if bool((count < 1).any()) or bool((below + equal > count).any()):
        raise ValueError(f"loss '{loss_name}': reference counts are inconsistent (need count ≥ 1 and below + equal ≤ "
                         "count)")
    return below, equal, count


# --------------------------------------------------------------------------------------- BOND / vBoN rewards
# Each: (b, e, k, N) -> (B,) reward, a constant of the update.
def bon_ratio_reward(below, equal, count, n: int) -> torch.Tensor:
    """log(π̂_BoN(y)/π_ref(y))/(N−1) with add-one p̂_<, p̂_≤ and the tie correction (§7.1) — the exact BOND reward."""
    p_lt, p_le = add_one_quantiles(below, equal, count)
    return bon_log_ratio(p_lt, p_le, n) / (n - 1)


def log_p_le_reward(below, equal, count, n: int) -> torch.Tensor:
    """log p̂_≤(y), add-one smoothed (BOND §3's quantile reward, no tie correction)."""
    return add_one_quantiles(below, equal, count)[1].log()


QUANTILE_REWARDS: dict[str, Callable[..., torch.Tensor]] = {"bon_ratio": bon_ratio_reward, "log_p_le": log_p_le_reward}
QuantileName = Literal["bon_ratio", "log_p_le"]


@dataclass
class BoNPGOptions(KLPGOptions):
    """The KL-regularised PG pieces with the defaults BOND / vBoN use, plus N and the reference sample count."""

    bon_n: int = 4  # N of the Best-of-N being distilled; sets the KL coefficient β = 1/(N−1)
    reference_samples: int = 16  # k: samples per prompt from π_ref whose rewards estimate the quantile (cached; our choice)
    reward_beta: float | None = None  # β of KL(π_θ‖π_ref) in the reward; null: 1/(bon_n − 1), the BoN target's
    advantage: AdvantageName = "rloo"  # leave-one-out baseline over the prompt's rollout.n samples (n ≥ 2)
    reward_kl: RewardKLName = "k1"  # KL in the reward, Σ_t (s_old − s_ref): the sequence-level KL(π_θ‖π_ref)
    policy: PolicyName = "reinforce"  # on-policy REINFORCE −Â·s_t (BOND); ppo_clip for several updates per batch
    kl: KLName = "none"  # no KL term in the loss: it is in the reward
    aggregation: Aggregation = "seq_mean_token_sum"  # A4: sequence log-likelihoods, the sequence-level objective

    def __post_init__(self):
        if self.reward_beta is None and isinstance(self.bon_n, int) and self.bon_n >= 2:
            # β = 1/(N−1) on the KL in the reward; with the KL in the loss instead (reward_kl: none), set `beta`
            self.reward_beta = 1.0 / (self.bon_n - 1) if self.reward_kl != "none" else 0.0

    def validate(self) -> None:
        check(isinstance(self.bon_n, int) and self.bon_n >= 2, f"bon_n (N of Best-of-N) must be an integer ≥ 2, "
              f"got {self.bon_n!r}")
        check(isinstance(self.reference_samples, int) and self.reference_samples >= 1,
              f"reference_samples must be an integer ≥ 1 (samples per prompt from π_ref), got {self.reference_samples!r}")
        check((self.reward_kl != "none" and self.reward_beta > 0) or (self.kl != "none" and self.beta > 0),
              "BoN distillation needs the KL(π_θ‖π_ref) term: keep reward_kl: k1 (default, β = 1/(bon_n − 1)) or set "
              "kl (e.g. k2) with beta > 0")
        super().validate()


class QuantileRewardPG(KLPG):
    """KL-regularised PG on a reward computed from the sample's rank among reference samples of its prompt."""

    Options = BoNPGOptions
    extra_needs = frozenset({"reference_rewards"})

    def quantile_reward(self, below: torch.Tensor, equal: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, batch: Batch, ctx) -> Batch:
        task = batch.extras.get(REWARD_KEY)
        reward = self.quantile_reward(*reference_counts(batch, self.name)).to(torch.float32)  # (B,), constant
        extras = {**batch.extras, REWARD_KEY: reward}
        if task is not None:
            extras["task_reward"] = task
        return super().prepare(dataclasses.replace(batch, extras=extras), ctx)

    def _metrics(self, logp, batch, term, kl_value):
        metrics = super()._metrics(logp, batch, term, kl_value)
        metrics["bon_reward_mean"] = metrics.pop("reward_mean")  # the quantile reward the PG maximises
        if "task_reward" in batch.extras:
            metrics["reward_mean"] = batch.extras["task_reward"].float().mean().item()
        metrics["beta"] = float(self.opt.reward_beta if self.opt.reward_kl != "none" else self.opt.beta)
        return metrics


@dataclass
class BONDOptions(BoNPGOptions):
    quantile: QuantileName = "bon_ratio"  # bon_ratio: log(π_BoN/π_ref)/(N−1) with ties (exact; our choice); log_p_le: the paper's log p̂_≤

    def validate(self) -> None:
        check(self.quantile in get_args(QuantileName),
              f"quantile must be one of {', '.join(get_args(QuantileName))}, got {self.quantile!r}")
        super().validate()


@register("bond")
class BOND(QuantileRewardPG):
    """BOND (Sessa et al. 2024): backward KL to Best-of-N of π_ref = RL on the quantile reward with β = 1/(N−1).

    r(y) = log(p̂_≤^N − p̂_<^N)/(p̂_≤ − p̂_<)/(N−1) (``quantile: bon_ratio``, ties exact) or log p̂_≤ (``log_p_le``),
    p̂ from k = ``reference_samples`` samples of π_ref per prompt, add-one smoothed (losses/bon.py).
    """

    Options = BONDOptions

    def quantile_reward(self, below, equal, count):
        return QUANTILE_REWARDS[self.opt.quantile](below, equal, count, self.opt.bon_n)


@dataclass
class VBoNOptions(BoNPGOptions):
    reference_samples: int = 32  # M: samples per prompt from π_ref whose rewards give the empirical CDF (cached; our choice, the vBoN code caches up to ~300)


@register("vbon")
class VBoN(QuantileRewardPG):
    """vBoN (Amini et al. 2024): max E[log F̂(r(y))] − β KL(π_θ‖π_ref), N = 1/β + 1.

    F̂(r) = (1 + #{r_j < r})/(M + 1) over M = ``reference_samples`` samples of π_ref per prompt (rycolab/vbon).
    """

    Options = VBoNOptions

    def quantile_reward(self, below, equal, count):
        return add_one_cdf(below, count).log()


# ------------------------------------------------------------------------------------------------------- J-BOND
JBONDAdvantage = Literal["batch_mean", "group_mean", "rloo"]
JBONDAggregation = Literal["seq_mean_token_sum", "seq_mean_token_mean"]


@dataclass
class JBONDOptions:
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
        check(self.advantage in get_args(JBONDAdvantage),
              f"advantage must be one of {', '.join(get_args(JBONDAdvantage))}, got {self.advantage!r}")
        check(self.aggregation in get_args(JBONDAggregation),
              f"aggregation must be one of {', '.join(get_args(JBONDAggregation))}, got {self.aggregation!r}")


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
