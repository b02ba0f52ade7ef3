"""RLOO, REINFORCE with a leave-one-out baseline, composed from the shared policy-gradient pieces."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .objective import KLPG, AdvantageName, KLName, KLPGOptions, PolicyName, RewardKLName


@dataclass
class RLOOOptions(KLPGOptions):
    advantage: AdvantageName = "rloo"  # leave-one-out baseline: Â_i = R'_i − mean_{j≠i} R'_j
    reward_kl: RewardKLName = "k1"  # KL in the reward, summed over the sequence: R' = R − β Σ_t (s_old − s_ref)
    reward_beta: float = 0.05  # TRL RLOOConfig.beta
    policy: PolicyName = "seq_ppo_clip"  # PPO clip on the sequence ratio π_θ(y)/π_old(y), mean over sequences (TRL)
    kl: KLName = "none"  # no KL term in the loss: it is in the reward


@register("rloo")
class RLOO(KLPG):
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740), TRL ``RLOOTrainer`` conventions.

    The paper's REINFORCE Leave-One-Out estimator: k samples y_1..y_k of a prompt, each baselined by the mean reward
    of the other k − 1, with the KL to π_ref inside the (sequence-level) reward,

        R'_i = R_i − β Σ_t (s^old_t − s^ref_t),      Â_i = R'_i − (1/(G−1)) Σ_{j≠i} R'_j,

    and, as TRL's ``RLOOTrainer`` optimises it, a PPO clip on the sequence ratio, averaged over sequences:

        ℓ_i = −min(ρ_i Â_i, clip(ρ_i, 0.8, 1.2) Â_i),     ρ_i = π_θ(y_i)/π_old(y_i).

    | symbol                      | option                                   | piece                        |
    |-----------------------------|------------------------------------------|------------------------------|
    | β Σ_t (s^old − s^ref)       | ``reward_kl: k1``, ``reward_beta: 0.05`` | ``kl.k1`` (in the reward)    |
    | Â (leave-one-out)           | ``advantage: rloo``                      | ``advantages.rloo``          |
    | −min(ρ_iÂ_i, clip(ρ_i)Â_i)  | ``policy: seq_ppo_clip``, ε = 0.2        | ``policy.sequence_ppo_clip`` |

    No KL term in the loss (``kl: none``): it is in the reward. Oracle: TRL RLOO's advantage and loss, verl
    ``compute_rloo_outcome_advantage`` (tested).
    """

    Options = RLOOOptions
