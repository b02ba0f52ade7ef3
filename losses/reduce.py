"""One reduction module for every per-token loss (LOSSES.md §0.1).

Each function returns *this micro-batch's share* of the loss of the whole optimizer batch, so the trainer simply
sums shares over micro-batches (gradient accumulation) and ranks. ``ctx`` carries the global counts.

| mode                   | LOSSES.md | optimizer-batch loss                      |
|------------------------|-----------|-------------------------------------------|
| token_mean             | A1        | Σ_{i,t} m ℓ / Σ_{i,t} m                   |
| micro_token_mean       | A2        | (1/K) Σ_k [Σ m ℓ / Σ m]_k                 |
| seq_mean_token_mean    | A3        | (1/B) Σ_i (Σ_t m ℓ / Σ_t m)               |
| seq_mean_token_sum     | A4        | (1/B) Σ_i Σ_t m ℓ                         |
| token_sum_norm         | A5        | Σ_{i,t} m ℓ / (B · T_max)                 |

Only A1, A3, A4 and A5 are independent of how the batch is split; A2 is offered to match implementations that use
it (verl SFT, the DFT and ASFT repositories).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from .base import LossContext

Aggregation = Literal["token_mean", "micro_token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__  # type: ignore[attr-defined]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, ctx: "LossContext") -> torch.Tensor:
    """(B, T) per-token losses and mask → scalar share of the optimizer-batch loss."""
    m = mask.to(per_token.dtype)
    # `where`, not a product, so a NaN/inf on a masked-out position cannot leak into the sum
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if mode == "token_mean":
        return masked.sum() / max(float(ctx.num_tokens), 1.0)
    if mode == "micro_token_mean":
        return masked.sum() / m.sum().clamp(min=1.0) / max(ctx.num_micro_batches, 1)
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(1) / m.sum(1).clamp(min=1.0)
        return per_seq.sum() / max(float(ctx.num_sequences), 1.0)
    if mode == "seq_mean_token_sum":
        return masked.sum() / max(float(ctx.num_sequences), 1.0)
    if mode == "token_sum_norm":
        return masked.sum() / max(float(ctx.num_sequences) * ctx.max_length, 1.0)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain mean of ``x`` over ``mask`` in this micro-batch (for metrics)."""
    m = mask.to(x.dtype)
    return (torch.where(mask, x, torch.zeros_like(x))).sum() / m.sum().clamp(min=1.0)
