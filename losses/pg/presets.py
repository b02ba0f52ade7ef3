"""Named presets of the KL-regularised policy gradient (LOSSES.md §6.2, §6.3 item 4).

Each preset is :class:`~losses.pg.objective.KLPG` with the defaults of the method it reproduces; every option can
still be overridden (``loss: {name: grpo, beta: 0.0}``). The oracle each was checked against is in its docstring
and in the README table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reduce import Aggregation
from ..registry import register
from .objective import KLPG, AdvantageName, KLName, KLPGOptions, PolicyName, ReferenceName, RewardKLName


@dataclass
class GRPOOptions(KLPGOptions):
    beta: float = 0.04  # DeepSeekMath §4.2 (TRL's default is 0.0: no KL, no reference model; DeepSeek-R1 used 0.001)
    aggregation: Aggregation = "seq_mean_token_mean"  # A3: (1/G) Σ_i (1/|o_i|) Σ_t, GRPO Eq. 3 (TRL loss_type "grpo")


@register("grpo")
class GRPO(KLPG):
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Eq. 3): group-normalised Â, PPO clip, k3 in the loss.

    ℓ = −min(ρÂ, clip(ρ, 0.8, 1.2)Â) + β·k3,  Â_i = (R_i − μ_g)/(σ_g + ε),  sequence-mean of token-means (A3).
    The paper's mode: β = 0.04, KL unweighted (C = 1). Oracle: TRL ``GRPOTrainer._compute_loss`` with
    ``loss_type="grpo"``, ``beta=0.04``, ``use_bias_correction_kl=False`` (tested to 1e-5, loss and gradients).
    """

    Options = GRPOOptions


@dataclass
class DrGRPOOptions(KLPGOptions):
    advantage: AdvantageName = "group_mean"  # Dr. GRPO removes the std: Â = R − μ_g (difficulty bias)
    beta: float = 0.0  # Dr. GRPO trains without a KL term (TRL default); set beta > 0 to add k3
    aggregation: Aggregation = "token_sum_norm"  # A5: Σ m ℓ / (B · T_max) (length bias); TRL loss_type "dr_grpo"


@register("dr_grpo")
class DrGRPO(KLPG):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, "GRPO done right"): GRPO without the two length/difficulty biases.

    Â_i = R_i − μ_g (no σ), PPO clip ε = 0.2, loss Σ_{i,t} m ℓ / (B·T_max) with T_max = ``max_completion_length``
    (the data max_length when null). Oracle: TRL ``loss_type="dr_grpo"`` (tested to 1e-5).
    """

    Options = DrGRPOOptions


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

    R'_i = R_i − β Σ_t (s^old_t − s^ref_t),  Â_i = R'_i − (1/(G−1)) Σ_{j≠i} R'_j,
    ℓ_i = −min(ρ_iÂ_i, clip(ρ_i, 0.8, 1.2)Â_i) with ρ_i = π_θ(y_i)/π_old(y_i), averaged over sequences.
    Oracle: TRL RLOO's advantage and loss, verl ``compute_rloo_outcome_advantage`` (tested).
    """

    Options = RLOOOptions


@dataclass
class ReinforcePPOptions(KLPGOptions):
    advantage: AdvantageName = "reinforce"  # r_t = R·1[t = EOS] − β k1_t, return-to-go (γ = 1), global whitening
    reward_kl: RewardKLName = "k1"  # OpenRLHF's rule: k1 in the reward (k2/k3 only in the loss)
    reward_beta: float = 0.01  # OpenRLHF --init_kl_coef default
    kl: KLName = "none"  # no KL term in the loss: it is in the reward


@register("reinforce_pp")
class ReinforcePP(KLPG):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262), OpenRLHF ``advantage_estimator=reinforce`` defaults.

    KL in the reward per token, r_t = R·1[t = EOS] − β·(s^old_t − s^ref_t); Â_t = whiten(Σ_{u≥t} r_u) over the
    experience batch; PPO clip ε = 0.2; token-mean. Oracle: OpenRLHF ``compute_advantages_and_returns``.
    """

    Options = ReinforcePPOptions


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

    ℓ = dual-clip PPO(ρ, Â; 0.2, 0.28, c = 10) + β (w − log w − 1),  w = π_θ/π_old,  Â = R − μ_g,  token-mean.
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

    Equal, under the iterative reference, to k3 with the non-detached ratio weight (C = ρ) — RPG's corrected GRPO KL.
    """

    Options = RPGURKLOptions
