"""Direct Coverage Optimization (DCO), a loss that lives outside the library.

Chen et al. 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves
Mathematical Reasoning". With p = π_θ(y|x) the sequence probability of the reference answer and N the number of
samples drawn at test time, DCO minimises the negative log-probability that at least one of N samples is y:

    ℓ(x, y) = −log(1 − (1 − p)^N)

Its gradient is the SFT gradient scaled by N(1−p)^(N−1) p / (1 − (1−p)^N): ≈1 while p ≪ 1/N, → 0 as p → 1, so
the model stops sharpening answers it already covers (confidence is limited, pass@N is the target).

Computed in log space: with L = log p ≤ 0, u = −log(1 − p) and A = N·u, ℓ = −log(1 − e^(−A)). For long answers
p underflows (L ≪ −700), so log u comes from L directly (u = p + p²/2 + … ⇒ log u ≈ L + p/2) and, for small A,
ℓ = −log A + A/2 − …; no branch ever evaluates log(0).

Use it:  loss: {name: examples/custom_loss/dco.py:DCO, n: 8}
"""

import math
from dataclasses import dataclass

import torch

from losses import Loss, check


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate everywhere (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dco_per_sequence(logp: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) sequence log-probs L → (B,) −log(1 − (1 − e^L)^n), stable for any L ≤ 0."""
    L = logp.clamp(max=-1e-12)
    big, small = L.clamp(min=-20.0), L.clamp(max=-20.0)  # each branch sees only inputs where it is finite
    log_u = torch.where(L > -20.0, torch.log(-log1mexp(big)), small + torch.exp(small) / 2)
    log_a = math.log(n) + log_u  # log A, A = n·u
    a_small, a_big = log_a.clamp(max=-10.0), log_a.clamp(min=-10.0)
    return torch.where(log_a < -10.0, -a_small + torch.exp(a_small) / 2, -log1mexp(-torch.exp(a_big)))


class DCO(Loss):
    """Direct Coverage Optimization: −log(1 − (1 − p(y|x))^N) per example, mean over examples."""

    @dataclass
    class Options:
        n: int = 8  # samples at test time whose coverage DCO maximises (N = 1 is plain sequence-level SFT)

        def validate(self):
            check(self.n >= 1, f"n must be a positive integer, got {self.n}")

    def __call__(self, logprobs, batch, ctx):
        seq_logp = (logprobs * batch.loss_mask).sum(1)  # (B,) log p(y|x)
        per_seq = dco_per_sequence(seq_logp, self.opt.n)
        return ctx.sequence_mean(per_seq), {"seq_logp": seq_logp.mean().item(),
                                            "coverage": torch.exp(-per_seq).mean().item()}
