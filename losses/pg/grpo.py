"""GRPO, DeepSeekMath Eq. 3, composed from the shared policy-gradient pieces (advantages, policy, kl, reduce)."""

from __future__ import annotations

from dataclasses import dataclass

from ..reduce import Aggregation
from ..registry import register
from .objective import KLPG, AdvantageName, KLName, KLPGOptions, PolicyName


@dataclass
class GRPOOptions(KLPGOptions):
    advantage: AdvantageName = "group_norm"  # Â = (r − mean r)/(std r + ε) within the prompt's group (§4.1.2)
    policy: PolicyName = "ppo_clip"  # the clipped surrogate min(ρÂ, clip(ρ, 1−ε, 1+ε)Â) of Eq. 3, per token
    kl: KLName = "k3"  # D_KL of Eq. 4: π_ref/π_θ − log(π_ref/π_θ) − 1, in the loss
    beta: float = 0.04  # DeepSeekMath §4.2 (TRL's default is 0.0: no KL, no reference model; DeepSeek-R1 used 0.001)
    aggregation: Aggregation = "seq_mean_token_mean"  # A3: (1/G) Σ_i (1/|o_i|) Σ_t, GRPO Eq. 3 (TRL loss_type "grpo")


@register("grpo")
class GRPO(KLPG):
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Eq. 3): group-normalised Â, PPO clip, k3 in the loss.

    For G completions o_1..o_G of one prompt q, sampled from π_old, Eq. 3 maximises

        J(θ) = (1/G) Σ_i (1/|o_i|) Σ_t { min[ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε, 1+ε) Â_{i,t}] − β D_KL[π_θ‖π_ref] }

        ρ_{i,t} = π_θ(o_{i,t}|q, o_{i,<t}) / π_old(o_{i,t}|q, o_{i,<t})
        Â_{i,t} = (r_i − mean(r)) / std(r)                   (§4.1.2, outcome supervision)
        D_KL    = π_ref/π_θ − log(π_ref/π_θ) − 1             (Eq. 4, per token: Schulman's k3)

    and this loss minimises −J, one shared piece per symbol:

    | symbol                  | option                               | piece                       |
    |-------------------------|--------------------------------------|-----------------------------|
    | Â                       | ``advantage: group_norm``            | ``advantages.group_norm``   |
    | min(ρÂ, clip(ρ)Â)       | ``policy: ppo_clip``, ε = 0.2        | ``policy.ppo_clip``         |
    | β D_KL                  | ``kl: k3``, ``beta: 0.04``, C = 1    | ``kl.k3``                   |
    | (1/G) Σ_i (1/|o_i|) Σ_t | ``aggregation: seq_mean_token_mean`` | ``reduce.aggregate`` (A3)   |

    Stop-gradients: Â, π_old and π_ref are constants; ρ and the KL term carry the gradient. Oracle: TRL
    ``GRPOTrainer._compute_loss`` with ``loss_type="grpo"``, ``beta=0.04``, ``use_bias_correction_kl=False``
    (tested to 1e-5, loss and gradients).
    """

    Options = GRPOOptions
