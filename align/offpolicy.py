"""Engine-vs-trainer log-prob mismatch, and the truncated importance-sampling weight that corrects for it.

Rollouts are sampled by the engine (vLLM kernels, possibly a few updates stale when ``rollout.sync_every > 1``);
the trainer recomputes the same tokens' log-probs with its own forward. Per generated token t:

    Δ_t = log π_trainer(y_t) − log π_engine(y_t),      ratio_t = exp(Δ_t)

In fp32 with the engine in sync, |Δ| is rounding (≤ 1e-4 on the tiny model, tested); bf16 kernels or stale weights
make it larger. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"): losses may multiply their per-token policy-gradient term by

    w_t = min(exp(Δ_t), C)                         # batch.extras["tis_weight"], (B, T), 0 off the loss mask
"""

from __future__ import annotations

import torch


def engine_mismatch(policy_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                    cap: float) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, tis_weight) for (B, T) trainer and engine log-probs of the realised tokens on ``mask``."""
    mask = mask.bool()
    delta = (policy_logprobs.float() - engine_logprobs.float()) * mask  # (B, T)
    ratio = torch.exp(delta)  # (B, T), 1 off the mask
    tis = torch.clamp(ratio, max=cap) * mask
    d, r = delta[mask], ratio[mask]
    if d.numel() == 0:
        return {}, tis
    metrics = {
        "logprob_diff_mean": float(d.abs().mean()),  # mean |Δ| over generated tokens
        "logprob_diff_max": float(d.abs().max()),
        "is_ratio_mean": float(r.mean()),
        "is_ratio_std": float(r.std(unbiased=False)),
        "is_ratio_min": float(r.min()),
        "is_ratio_max": float(r.max()),
        "tis_truncated": float((r > cap).float().mean()),  # fraction of tokens whose weight hit C
    }
    return {f"mismatch/{k}": v for k, v in metrics.items()}, tis
