"""Policy terms PG_{i,t}(θ) of the unified objective (LOSSES.md §6.3 item 2, §6.1 for the RPG variants).

Inputs: ``logp`` s_t under π_θ (differentiable), ``old`` s_t^old (constant), ``adv`` Â (constant), all (B, T).
ρ_t = exp(s_t − s_t^old); its log is clamped to [−20, 20] before exp (verl, OpenRLHF; TRL does not clamp).

| term                 | per-token loss                                                       | source |
|----------------------|----------------------------------------------------------------------|--------|
| ppo_clip             | max(−ρÂ, −clip(ρ, 1−ε_l, 1+ε_h)Â), and for Â < 0 also min(·, −cÂ)    | PPO (Schulman 2017) Eq. 7; dual clip (Ye et al. 2020); verl ``compute_policy_loss_vanilla`` |
| sequence_ppo_clip    | the same with ρ_i = exp(Σ_t m (s − s^old)), one loss per sequence     | TRL ``RLOOTrainer`` |
| reinforce            | −Â·s_t                                                               | REINFORCE (on-policy) |
| is_reinforce         | −sg(clip(ρ, 1−ε_l, 1+ε_h))·Â·s_t                                      | truncated importance-sampled REINFORCE |
| rpg_reinforce        | −sg(Â·w̄ + KL_t)·s_t,  w̄ = clip(ρ, 1−ε_l, 1+ε_h)                      | RPG Table 2 / App. F; RPG ``compute_policy_loss_reinforce`` |
| rpg_reinforce_clip   | RPG Alg. 2: as rpg_reinforce, gradient switched off where PPO's clip binds | RPG ``compute_policy_loss_reinforce`` ``*_clip_ppo`` |

RPG-REINFORCE's KL component KL_t(w̄) (β = the KL coefficient): fkl +β, rkl −βw̄(log w̄ + 1), ufkl β(1 − w̄),
urkl −βw̄ log w̄ — the REINFORCE weights whose gradient equals the differentiable surrogates' (Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyTerm:
    loss: torch.Tensor  # (B, T) per-token loss; a sequence-level term repeats the sequence's loss on its tokens
    ratio: torch.Tensor  # (B, T) ρ (detached), for metrics
    clipped: torch.Tensor  # (B, T) bool: tokens whose gradient (or IS weight) the clip changed
    reduce: str | None = None  # the aggregation this term needs (sequence-level: a mean over sequences)


def log_ratio(logp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """log ρ = s − s^old clamped to [−20, 20] (verl, OpenRLHF)."""
    return (logp - old).clamp(-20.0, 20.0)


def _clip_loss(ratio, adv, eps_low, eps_high, dual_clip):
    """PPO Eq. 7 as a loss, with the dual clip for Â < 0; returns (loss, clipped)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    # the clip binds (zero gradient): ρ < 1−ε_l with Â < 0, or ρ > 1+ε_h with Â > 0 (TRL's clip_ratio/region)
    region = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
        region = region | ((adv < 0) & (ratio > dual_clip))
    return loss, region


def ppo_clip(logp, old, adv, eps_low: float, eps_high: float, dual_clip: float | None = None) -> PolicyTerm:
    """Token-level clipped surrogate, −min(ρÂ, clip(ρ)Â), plus the dual clip −cÂ bound for Â < 0."""
    ratio = log_ratio(logp, old).exp()
    loss, region = _clip_loss(ratio, adv, eps_low, eps_high, dual_clip)
    return PolicyTerm(loss, ratio.detach(), region)


def sequence_ppo_clip(logp, old, adv, mask, eps_low: float, eps_high: float) -> PolicyTerm:
    """Sequence-level ratio ρ_i = π_θ(y_i)/π_old(y_i) and one clipped loss per sequence (TRL RLOO)."""
    m = mask.to(logp.dtype)
    seq_log_ratio = ((logp - old) * m).sum(1).clamp(-20.0, 20.0)  # (B,)
    seq_adv = (adv * m).sum(1) / m.sum(1).clamp(min=1)  # (B,) outcome Â (constant over tokens)
    ratio = seq_log_ratio.exp()
    loss, region = _clip_loss(ratio, seq_adv, eps_low, eps_high, None)
    shape = mask.shape
    return PolicyTerm(loss[:, None].expand(shape), ratio.detach()[:, None].expand(shape),
                      region[:, None].expand(shape), reduce="seq_mean_token_mean")


def reinforce(logp, old, adv) -> PolicyTerm:
    """−Â·s_t: the on-policy score-function gradient E[Â ∇ log π_θ]."""
    ratio = log_ratio(logp, old).exp().detach()
    return PolicyTerm(-adv * logp, ratio, torch.zeros_like(logp, dtype=torch.bool))


def is_reinforce(logp, old, adv, eps_low: float, eps_high: float) -> PolicyTerm:
    """−sg(ρ̄)·Â·s_t with ρ̄ = clip(ρ, 1−ε_l, 1+ε_h): REINFORCE reweighted to π_θ with a truncated IS weight."""
    ratio = log_ratio(logp, old).exp().detach()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    return PolicyTerm(-weight * adv * logp, ratio, (ratio < 1 - eps_low) | (ratio > 1 + eps_high))


# KL component of the RPG-REINFORCE weight as a function of w̄ and β (RPG ``compute_policy_loss_reinforce``).
RPG_REINFORCE_KL = {
    "rpg_fkl": lambda w_bar, beta: torch.full_like(w_bar, beta),
    "rpg_rkl": lambda w_bar, beta: -beta * w_bar * (w_bar.log() + 1),
    "rpg_ufkl": lambda w_bar, beta: beta * (1 - w_bar),
    "rpg_urkl": lambda w_bar, beta: -beta * w_bar * w_bar.log(),
}


def rpg_reinforce_kl(w_bar: torch.Tensor, kl: str, beta: float) -> torch.Tensor:
    """KL_t(w̄), (B, T)."""
    if kl not in RPG_REINFORCE_KL:
        raise ValueError(f"RPG-REINFORCE needs kl in {' | '.join(RPG_REINFORCE_KL)}, got {kl!r}")
    return RPG_REINFORCE_KL[kl](w_bar, beta)


def rpg_reinforce(logp, old, adv, kl: str, beta: float, eps_low: float, eps_high: float) -> PolicyTerm:
    """RPG-REINFORCE: −sg(Â·w̄ + KL_t(w̄))·s_t, w̄ = clip(w, 1−ε_l, 1+ε_h), w = π_θ/π_old."""
    w = log_ratio(logp, old).exp().detach()
    w_bar = w.clamp(1 - eps_low, 1 + eps_high)
    weight = adv * w_bar + rpg_reinforce_kl(w_bar, kl, beta)
    return PolicyTerm(-weight * logp, w, (w < 1 - eps_low) | (w > 1 + eps_high))


def rpg_reinforce_clip(logp, old, adv, kl: str, beta: float, eps_low: float, eps_high: float,
                       dual_clip: float | None = None) -> PolicyTerm:
    """RPG Alg. 2 (the ``*_clip_ppo`` branch of ``compute_policy_loss_reinforce``).

    Inside PPO's trust region the loss is −sg(Â·w + KL_t)·s_t; where PPO's clip would bind — Â > 0 and
    w ≥ 1+ε_h; Â ≤ 0 and w < 1−ε_l; Â ≤ 0 and w ≥ c — the loss is the code's constant (its value on sg(s_t)) and
    carries no gradient.
    """
    c = float("inf") if dual_clip is None else dual_clip
    w = log_ratio(logp, old).exp().detach()
    kl_t = rpg_reinforce_kl(w.clamp(1 - eps_low, 1 + eps_high), kl, beta)
    s_const = logp.detach()
    inside = (adv * w + kl_t) * logp  # (Â w + KL_t)·s with sg on the weight
    high = (adv * (1 + eps_high) - kl_t) * s_const
    low = (adv * (1 - eps_low) - kl_t) * s_const
    dual = (adv * c + kl_t) * s_const if dual_clip is not None else s_const
    pos = torch.where(w < 1 + eps_high, inside, high)
    neg = torch.where(w < c, torch.where(w < 1 - eps_low, low, inside), dual)
    loss = -torch.where(adv > 0, pos, neg)
    region = torch.where(adv > 0, w >= 1 + eps_high, (w < 1 - eps_low) | (w >= c))
    return PolicyTerm(loss, w, region)
