"""Shared pieces of the preference losses (LOSSES.md §2.1): sequence log-probs of chosen / rejected rows, and the
metrics every pairwise loss logs.

A preference batch holds pair ``i`` in rows ``2i`` (chosen y_w) and ``2i + 1`` (rejected y_l) (``Batch.pairs``).
Sequence log-probs are masked *sums* of per-token log-probs, ``log π(y|x) = Σ_t m_t s_t``; variants that average
(IPO length-normalised, SimPO) divide by the number of loss tokens ``|y|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch


@dataclass
class PairLogps:
    """Per-pair sequence quantities, each (P,) for P pairs."""

    chosen: torch.Tensor  # Σ_t m_t s_t of y_w
    rejected: torch.Tensor  # Σ_t m_t s_t of y_l
    chosen_len: torch.Tensor  # |y_w|: loss tokens of y_w (float)
    rejected_len: torch.Tensor  # |y_l|

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_len

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_len


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token log-probs → (B,) masked sums. ``where`` keeps a NaN off the mask out of the sum."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(1)


def pair_logps(per_token: torch.Tensor, batch: Batch, loss_name: str) -> PairLogps:
    """(B, T) per-token log-probs of a preference batch → chosen / rejected sums and lengths.

    Raises ``ValueError`` naming the dataset rows of a pair whose chosen or rejected side has no loss token (its
    average log-prob would be 0/0 = NaN): such a row cannot carry a preference.
    """
    lengths = batch.loss_mask.sum(1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        index = batch.extras.get("index")
        rows = [int(index[r]) for r in empty] if index is not None else empty
        side = ["chosen" if r % 2 == 0 else "rejected" for r in empty]
        raise ValueError(
            f"loss '{loss_name}': {', '.join(f'{s} of dataset row {i}' for s, i in zip(side, rows))} has no loss "
            "tokens; every preference pair needs a non-empty chosen and rejected completion (check max_length)"
        )
    seq = sequence_logps(per_token, batch.loss_mask)
    chosen, rejected = batch.pairs(seq)
    n_w, n_l = batch.pairs(lengths.to(per_token.dtype))
    return PairLogps(chosen=chosen, rejected=rejected, chosen_len=n_w, rejected_len=n_l)


def reward_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, policy: PairLogps) -> dict[str, float]:
    """Implicit-reward metrics (detached), as TRL / the SimPO repo log them: means over this micro-batch's pairs."""
    r_w, r_l = chosen_reward.detach(), rejected_reward.detach()
    return {
        "rewards/chosen": r_w.mean().item(),
        "rewards/rejected": r_l.mean().item(),
        "rewards/margins": (r_w - r_l).mean().item(),
        "rewards/accuracy": (r_w > r_l).float().mean().item(),  # preference accuracy (ties count as wrong)
        "logps/chosen": policy.chosen.detach().mean().item(),
        "logps/rejected": policy.rejected.detach().mean().item(),
    }
