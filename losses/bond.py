"""Best-of-N distillation by policy gradient: BOND and vBoN (LOSSES.md §7.3, §7.4); J-BOND is in losses/jbond.py.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .base import check
from .batch import Batch
from .bon import add_one_cdf, add_one_quantiles, bon_log_ratio, reference_counts
from .pg.objective import KLPG, REWARD_KEY, AdvantageName, KLName, KLPGOptions, PolicyName, RewardKLName
from .reduce import Aggregation
from .registry import register


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
        super().__post_init__()

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
