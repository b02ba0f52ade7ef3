"""REINFORCE++, PPO's clip on a whitened REINFORCE return, composed from the shared policy-gradient pieces."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .objective import KLPG, AdvantageName, KLName, KLPGOptions, RewardKLName


@dataclass
class ReinforcePPOptions(KLPGOptions):
    advantage: AdvantageName = "reinforce"  # r_t = R·1[t = EOS] − β k1_t, return-to-go (γ = 1), global whitening
    reward_kl: RewardKLName = "k1"  # OpenRLHF's rule: k1 in the reward (k2/k3 only in the loss)
    reward_beta: float = 0.01  # OpenRLHF --init_kl_coef default
    kl: KLName = "none"  # no KL term in the loss: it is in the reward


@register("reinforce_pp")
class ReinforcePP(KLPG):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262), OpenRLHF ``advantage_estimator=reinforce`` defaults.

    No critic and no group baseline: the KL to π_ref is a per-token reward, the return is summed to the end of the
    sequence (γ = 1) and whitened over the whole experience batch, and PPO's clip bounds the update:

        r_t = R·1[t = EOS] − β (s^old_t − s^ref_t),     Â_t = whiten( Σ_{u≥t} r_u ),
        ℓ_t = −min(ρ_t Â_t, clip(ρ_t, 0.8, 1.2) Â_t),  token-mean over the batch (A1).

    | symbol                   | option                                   | piece                                   |
    |--------------------------|------------------------------------------|-----------------------------------------|
    | β (s^old − s^ref)        | ``reward_kl: k1``, ``reward_beta: 0.01`` | ``kl.k1`` (in the reward, per token)    |
    | whiten(Σ_{u≥t} r_u)      | ``advantage: reinforce``                 | ``advantages.reinforce``                |
    | −min(ρÂ, clip(ρ)Â)       | ``policy: ppo_clip``, ε = 0.2            | ``policy.ppo_clip``                     |

    Oracle: OpenRLHF ``compute_advantages_and_returns``.
    """

    Options = ReinforcePPOptions
