"""RPG-UFKL and RPG-URKL: dual-clip PPO plus a differentiable unnormalised-KL surrogate to π_old (Zhang et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .objective import KLPG, AdvantageName, KLName, KLPGOptions, ReferenceName


@dataclass
class RPGUFKLOptions(KLPGOptions):
    advantage: AdvantageName = "group_mean"  # RPG ``rpg`` estimator: R − μ_g (no std)
    epsilon_high: float = 0.28  # RPG scripts: clip_ratio_low 0.2, clip_ratio_high 0.28
    dual_clip: float | None = 10.0  # RPG scripts: clip_ratio_c = 10
    kl: KLName = "rpg_ufkl"  # w − log w − 1, differentiable through w = π_θ/π_old (RPG Table 1, UFKL)
    beta: float = 1e-4  # RPG App. H: β = 1e-4
    reference: ReferenceName = "iterative"  # RPG use_iterative_ref_model: π_old is the KL reference
    minibatches: int = 4  # the iterative KL acts only once π_θ moves off π_old; RPG takes 16 steps per rollout batch


@register("rpg_ufkl")
class RPGUFKL(KLPG):
    """RPG-UFKL (Zhang et al. 2025, arXiv 2505.17508, ICLR 2026): dual-clip PPO + β·UKL(π_old‖π_θ) surrogate.

    Table 1's UFKL objective, E_{π_θ}[R] − β UKL(π_old‖π_θ), with the surrogate β (w − log w − 1), w = π_θ/π_old,
    differentiated through w, plus the RPG-style dual clip of §3.3 (Alg. 1) on the policy term:

        ℓ_t = dual-clip PPO(ρ_t, Â; ε_l = 0.2, ε_h = 0.28, c = 10) + β (w_t − log w_t − 1),   Â = R − μ_g,  A1.

    | symbol                     | option                                        | piece                       |
    |----------------------------|-----------------------------------------------|-----------------------------|
    | Â                          | ``advantage: group_mean``                     | ``advantages.group_mean``   |
    | dual-clip PPO              | ``policy: ppo_clip``, ``dual_clip: 10``       | ``policy.ppo_clip``         |
    | β (w − log w − 1)          | ``kl: rpg_ufkl``, ``reference: iterative``    | ``kl.rpg_ufkl``             |

    Oracle: RPG repo ``core_algos.kl_penalty('rpg_ufkl')`` + ``compute_policy_loss``; the surrogate's value and
    gradient equal LOSSES.md §10's test vector.
    """

    Options = RPGUFKLOptions


@dataclass
class RPGURKLOptions(RPGUFKLOptions):
    kl: KLName = "rpg_urkl"  # w (log w − 1) + 1, differentiable through w (RPG Table 1, URKL = UKL(π_θ‖π_old))


@register("rpg_urkl")
class RPGURKL(KLPG):
    """RPG-URKL (Zhang et al. 2025): as rpg_ufkl with the reverse unnormalised KL, β·(w(log w − 1) + 1).

    ``kl: rpg_urkl``: Table 1's URKL surrogate β (w log w − w), shifted by β so that it is 0 at w = 1 (``kl.rpg_urkl``).
    Equal, under the iterative reference, to k3 with the non-detached ratio weight (C = ρ) — RPG's corrected GRPO KL.
    """

    Options = RPGURKLOptions
