"""Advantage estimators for outcome rewards (LOSSES.md §6.2, §6.3 item 1).

Input: one scalar reward R_i per completion (B,), the prompt each completion belongs to (``group_ids``, (B,)),
the completion mask (B, T) and an optional per-token KL penalty p_{i,t} = β_rew·K(s^old − s^ref) (B, T).
Output: Â (B, T), zero off the mask, a constant of the update (computed once per experience batch, no gradient).

| name                 | Â_{i,t}                                                            | source |
|----------------------|--------------------------------------------------------------------|--------|
| group_norm           | (R'_i − μ_g) / (σ_g + ε)                                           | GRPO (DeepSeekMath §4.1.2); TRL ``scale_rewards="group"`` |
| group_mean           | R'_i − μ_g                                                         | Dr. GRPO; RPG ``rpg`` |
| rloo                 | R'_i − mean_{j≠i} R'_j = (G/(G−1)) (R'_i − μ_g)                    | RLOO (Ahmadian et al. 2024); TRL RLOO; verl ``rloo`` |
| batch_mean           | R'_i − mean_batch R'                                              | RPG ``rpg_batchmean`` |
| reinforce            | whiten_batch( Σ_{u≥t} r_{i,u} ),  r_{i,u} = R_i·1[u = T_i] − p_{i,u} | REINFORCE++ (OpenRLHF ``reinforce``) |
| reinforce_baseline   | as reinforce with R_i − μ_g in place of R_i                        | REINFORCE++-baseline (OpenRLHF ``reinforce_baseline``) |

Outcome estimators (the first four) see the KL penalty summed over the sequence, R'_i = R_i − Σ_t p_{i,t}, *before*
the baseline (TRL RLOO's convention: the KL enters the leave-one-out baseline too). The REINFORCE++ estimators put
it per token and take the return-to-go (γ = 1), as OpenRLHF does.

Conventions, with the oracle each follows:
* σ_g is the Bessel-corrected group std (``torch.std``: TRL ``nanstd``, verl, OpenRLHF); ε = ``std_eps``
  (TRL 1e-4, verl 1e-6, OpenRLHF 1e-9).
* A group of one completion has no baseline: its group_norm / group_mean / rloo advantage is 0 (TRL: NaN → 0).
  (verl instead uses μ = 0, σ = 1 for singletons, i.e. Â = R.) A group whose rewards are all equal gets Â = 0.
* Whitening uses the token-weighted mean and *population* variance over every loss token of the experience batch,
  (x − mean)·rsqrt(max(var, 1e-8)) — OpenRLHF's ``compute_advantages_and_returns``.
"""

from __future__ import annotations

from typing import Callable

import torch

Estimator = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


# ------------------------------------------------------------------------------------------------- group helpers
def _require_groups(group_ids: torch.Tensor | None, name: str) -> torch.Tensor:
    if group_ids is None:
        raise ValueError(f"advantage '{name}' compares completions of the same prompt, but batch.group_ids is None; "
                         "the experience must hold groups of completions per prompt (rollout n > 1), or use "
                         "advantage 'batch_mean' / 'reinforce'")
    return group_ids


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the mean, Bessel-corrected std (0 for a group of one) and size of its group. All (B,)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    v = values.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, inverse, torch.ones_like(v))
    total = torch.zeros_like(count).index_add_(0, inverse, v)
    mean = (total / count)[inverse]
    sq = torch.zeros_like(count).index_add_(0, inverse, (v - mean).square())
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    dt = values.dtype
    return mean.to(dt), var.sqrt()[inverse].to(dt), count[inverse].to(dt)


def group_normalized(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """(R − μ_g) / (σ_g + ε), (B,)."""
    mean, std, count = group_stats(rewards, group_ids)
    return torch.where(count > 1, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def group_centered(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """R − μ_g, (B,) (0 for a group of one, where R = μ_g)."""
    mean, _, _ = group_stats(rewards, group_ids)
    return rewards - mean


def leave_one_out(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """R_i − (1/(G−1)) Σ_{j≠i} R_j = (G/(G−1)) (R_i − μ_g), (B,); 0 for a group of one."""
    mean, _, count = group_stats(rewards, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return scale * (rewards - mean)


def batch_centered(rewards: torch.Tensor) -> torch.Tensor:
    """R − mean over the experience batch, (B,)."""
    return rewards - rewards.mean()


# ------------------------------------------------------------------------------------------------- token helpers
def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) with R_i on the last loss token of row i (its EOS), 0 elsewhere (OpenRLHF ``compute_reward``)."""
    T = mask.shape[1]
    last = T - 1 - mask.long().flip(1).argmax(1)  # (B,)
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    has_tokens = mask.any(1)
    out[has_tokens, last[has_tokens]] = rewards[has_tokens]
    return out


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{u ≥ t} m_u r_u (γ = 1), (B, T), zero off the mask."""
    r = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    return torch.where(mask, r.flip(1).cumsum(1).flip(1), torch.zeros_like(r))


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) · rsqrt(max(var, eps)) over the masked entries (population variance), zero off the mask."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / n
    return torch.where(mask, (x - mean) * var.clamp(min=eps).rsqrt(), torch.zeros_like(x))


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_seq[:, None].expand(mask.shape), torch.zeros(mask.shape, dtype=per_seq.dtype,
                                                                                device=per_seq.device))


def _shaped_outcome(rewards: torch.Tensor, mask: torch.Tensor, penalty: torch.Tensor | None) -> torch.Tensor:
    """R'_i = R_i − Σ_t m p_{i,t} (KL in the reward at sequence level), (B,)."""
    if penalty is None:
        return rewards
    return rewards - torch.where(mask, penalty, torch.zeros_like(penalty)).sum(1).to(rewards.dtype)


# ------------------------------------------------------------------------------------------------- estimators
# Each: (rewards (B,), group_ids (B,) | None, mask (B, T), penalty (B, T) | None, std_eps) -> Â (B, T).
def group_norm(rewards, group_ids, mask, penalty, std_eps):
    """GRPO: (R' − μ_g)/(σ_g + ε)."""
    r = _shaped_outcome(rewards, mask, penalty)
    return _broadcast(group_normalized(r, _require_groups(group_ids, "group_norm"), std_eps), mask)


def group_mean(rewards, group_ids, mask, penalty, std_eps):
    """Dr. GRPO / RPG: R' − μ_g."""
    r = _shaped_outcome(rewards, mask, penalty)
    return _broadcast(group_centered(r, _require_groups(group_ids, "group_mean")), mask)


def rloo(rewards, group_ids, mask, penalty, std_eps):
    """RLOO: R'_i − mean_{j≠i} R'_j."""
    r = _shaped_outcome(rewards, mask, penalty)
    return _broadcast(leave_one_out(r, _require_groups(group_ids, "rloo")), mask)


def batch_mean(rewards, group_ids, mask, penalty, std_eps):
    """RPG batch-mean baseline: R' − mean_batch R'."""
    return _broadcast(batch_centered(_shaped_outcome(rewards, mask, penalty)), mask)


def reinforce(rewards, group_ids, mask, penalty, std_eps):
    """REINFORCE++: whitened return-to-go of r_t = R·1[t = EOS] − p_t."""
    r = outcome_token_rewards(rewards, mask)
    if penalty is not None:
        r = r - penalty.to(r.dtype)
    return whiten(returns_to_go(r, mask), mask)


def reinforce_baseline(rewards, group_ids, mask, penalty, std_eps):
    """REINFORCE++-baseline: REINFORCE++ on R − μ_g."""
    centered = group_centered(rewards, _require_groups(group_ids, "reinforce_baseline"))
    return reinforce(centered, None, mask, penalty, std_eps)


ESTIMATORS: dict[str, Estimator] = {
    "group_norm": group_norm,
    "group_mean": group_mean,
    "rloo": rloo,
    "batch_mean": batch_mean,
    "reinforce": reinforce,
    "reinforce_baseline": reinforce_baseline,
}

# Estimators whose Â is one number per sequence (they may drive a sequence-level ratio).
OUTCOME_ESTIMATORS = ("group_norm", "group_mean", "rloo", "batch_mean")
