"""Dr. GRPO, GRPO without its length and difficulty biases, composed from the shared policy-gradient pieces."""

from __future__ import annotations

from dataclasses import dataclass

from ..reduce import Aggregation
from ..registry import register
from .objective import KLPG, AdvantageName, KLPGOptions


@dataclass
class DrGRPOOptions(KLPGOptions):
    advantage: AdvantageName = "group_mean"  # Dr. GRPO removes the std: Â = R − μ_g (difficulty bias)
    beta: float = 0.0  # Dr. GRPO trains without a KL term (TRL default); set beta > 0 to add k3
    aggregation: Aggregation = "token_sum_norm"  # A5: Σ m ℓ / (B · T_max) (length bias); TRL loss_type "dr_grpo"


@register("dr_grpo")
class DrGRPO(KLPG):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, "GRPO done right"): GRPO without the two length/difficulty biases.

    GRPO's objective (DeepSeekMath Eq. 3, losses/pg/grpo.py) with its two normalisers taken out: the per-response
    1/|o_i| (which favours long wrong answers) and the std(r) of the advantage (which up-weights too easy and too
    hard prompts). Over the experience batch of B completions,

        J(θ) = (1/(B·T_max)) Σ_i Σ_t min[ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε) Â_i],     Â_i = r_i − mean_g(r)

    with T_max = ``max_completion_length`` (the data max_length when null), a constant, so every token weighs the same.

    | symbol                 | option                            | piece                       |
    |------------------------|-----------------------------------|-----------------------------|
    | Â                      | ``advantage: group_mean``         | ``advantages.group_mean``   |
    | min(ρÂ, clip(ρ)Â)      | ``policy: ppo_clip``, ε = 0.2     | ``policy.ppo_clip``         |
    | 1/(B·T_max) Σ_i Σ_t    | ``aggregation: token_sum_norm``   | ``reduce.aggregate`` (A5)   |

    No KL term by default (β = 0); ``beta > 0`` adds β·k3 as GRPO does. Oracle: TRL ``loss_type="dr_grpo"``
    (tested to 1e-5).
    """

    Options = DrGRPOOptions
