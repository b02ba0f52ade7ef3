"""Per-token KL estimators (Schulman 2020) and RPG's KL surrogates (LOSSES.md §0.2, §6.1).

All take the realised-token log-probs ``logp`` = s_t under π_θ and ``ref`` = s_t^ref under the KL reference
(the fixed π_ref, or π_old for the iterative reference), both (B, T), and return (B, T). With δ = s − s_ref:

| name     | value                          | d value / d s   | used as a loss on samples from π_θ, E[∇] = | clamps (as the oracle)                 |
|----------|--------------------------------|-----------------|---------------------------------------------|----------------------------------------|
| k1       | δ                              | 1               | 0 (k1 belongs in the reward)               | none (verl ``k1``, TRL RLOO)           |
| k2       | ½ δ²                           | δ               | ∇ KL(π_θ‖π_ref)                            | none (verl ``k2``)                     |
| k3       | e^{−δ} − 1 + δ                 | 1 − e^{−δ}      | ∇ KL(π_ref‖π_θ) — the *forward* KL         | −δ to [−20, 20] before exp, value to [−10, 10] (verl ``low_var_kl``) |
| k3+      | value of k3, gradient of k2    | δ               | ∇ KL(π_θ‖π_ref)                            | the value as k3 (verl ``k3+``)         |

RPG surrogates (Zhang et al. 2025, arXiv 2505.17508, Table 1; RPG repo ``core_algos.kl_penalty``), with
w = π_θ/π_ref = e^δ. Their expectations over samples from π_ref (= π_old under the iterative reference) are the
divergences themselves, and they are differentiable through w:

| name     | value               | d / d s       | E_{π_ref}[value]      | clamps (RPG code) |
|----------|---------------------|---------------|-----------------------|-------------------|
| rpg_fkl  | −log w              | −1            | KL(π_ref‖π_θ)         | none              |
| rpg_rkl  | w log w             | w (log w + 1) | KL(π_θ‖π_ref)         | value to [−10, 10] |
| rpg_ufkl | w − log w − 1       | w − 1         | UKL(π_ref‖π_θ)        | value to [−10, 10] |
| rpg_urkl | w (log w − 1) + 1   | w log w       | UKL(π_θ‖π_ref)        | value to [−10, 10] |

``rpg_urkl`` is Table 1's β(w log w − w) plus the constant β (the code's form, zero at w = 1): same gradient.
A clamp zeroes the gradient where it binds, exactly as in the oracles. OpenRLHF instead clamps every estimator
(k1 included) to [−10, 10]; the two agree whenever |value| < 10.
"""

from __future__ import annotations

from typing import Callable

import torch

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """δ = s − s_ref."""
    return logp - ref


def k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """½ δ²."""
    return 0.5 * (logp - ref).square()


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """u − 1 − log u with u = π_ref/π_θ = e^{−δ} (GRPO paper Eq. 4; verl ``low_var_kl``, with its clamps)."""
    neg_delta = (ref - logp).clamp(-20.0, 20.0)  # log u
    return (neg_delta.exp() - neg_delta - 1).clamp(-10.0, 10.0)


def k3_plus(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Straight-through: the value of k3, the gradient of k2 (verl ``k3+``): k2 − sg(k2) + sg(k3)."""
    grad_part = k2(logp, ref)
    return grad_part - grad_part.detach() + k3(logp, ref).detach()


def rpg_fkl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """−log w (RPG Table 1, FKL row: the −β log π_θ term up to a constant)."""
    return ref - logp


def rpg_rkl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """w log w (RPG Table 1, RKL row)."""
    log_w = logp - ref
    return (log_w.exp() * log_w).clamp(-10.0, 10.0)


def rpg_ufkl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """w − log w − 1 (RPG Table 1, UFKL row)."""
    log_w = logp - ref
    return (log_w.exp() - log_w - 1).clamp(-10.0, 10.0)


def rpg_urkl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """w (log w − 1) + 1 (RPG Table 1, URKL row, plus the constant 1)."""
    log_w = logp - ref
    return (log_w.exp() * (log_w - 1) + 1).clamp(-10.0, 10.0)


# KL estimators that may sit in the reward (shaping r_t with −β·K(s_old − s_ref)); they need no gradient there.
REWARD_KL: dict[str, KLFn] = {"k1": k1, "k2": k2, "k3": k3}

# KL terms that may sit in the loss, differentiated through s = log π_θ.
LOSS_KL: dict[str, KLFn] = {
    "k1": k1, "k2": k2, "k3": k3, "k3+": k3_plus,
    "rpg_fkl": rpg_fkl, "rpg_rkl": rpg_rkl, "rpg_ufkl": rpg_ufkl, "rpg_urkl": rpg_urkl,
}

RPG_KL = ("rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl")
