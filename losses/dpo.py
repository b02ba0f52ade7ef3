"""Direct Preference Optimization and its pairwise variants (LOSSES.md §2).

DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): with the log-ratio margin

    h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

minimise −log σ(β h) = softplus(−β h). The policy is pushed to raise the chosen completion's likelihood relative to
the reference more than the rejected one's; β sets how far it may drift from π_ref.

Variants (``variant:``), each a small per-pair function below (one table, no flags on the class):

| variant   | per-pair loss                                             | source                                      |
|-----------|-----------------------------------------------------------|---------------------------------------------|
| sigmoid   | softplus(−βh)                                             | DPO paper Eq. 7                             |
| cdpo      | (1−ε)·softplus(−βh) + ε·softplus(βh)                      | Mitchell's cDPO note, Eq. 3                 |
| robust    | [(1−ε)·softplus(−βh) − ε·softplus(βh)] / (1−2ε)           | Chowdhury et al. 2024 (rDPO)                |
| ipo_sum   | (h − 1/(2β))²  on summed log-ratios                       | IPO Eq. 17 as eric-mitchell / OpenRLHF      |
| ipo_mean  | (h̃ − 1/(2β))², h̃ = Δ_w/|y_w| − Δ_l/|y_l| (per-token mean) | IPO as TRL (`loss_type="ipo"`) and oat      |

``dpo_ref_free`` is the same loss with a uniform reference, log π_ref ≡ 0 (eric-mitchell ``reference_free``): it
declares no ``ref_logprobs``, so no reference model is loaded or precomputed.

Per-pair losses are averaged over the pairs of the optimizer batch. Only π_θ receives gradients; reference log-probs
are constants and the logged implicit rewards r = β·sg(log π_θ − log π_ref) are detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .base import Loss, check
from .batch import Batch
from .pairs import PairLogps, pair_logps, reward_metrics
from .registry import register


# ----------------------------------------------------------------------------------------- per-pair variant losses
# Each takes the (P,) log-ratios Δ = log π_θ − log π_ref of chosen / rejected (with their lengths), β and ε.
def sigmoid_loss(r: PairLogps, beta: float, eps: float) -> torch.Tensor:
    """DPO Eq. 7: −log σ(βh) = softplus(−βh)."""
    return F.softplus(-beta * (r.chosen - r.rejected))


def cdpo_loss(r: PairLogps, beta: float, eps: float) -> torch.Tensor:
    """Conservative DPO (cDPO note, Eq. 3): the DPO loss under labels flipped with probability ε,
    (1−ε)·softplus(−βh) + ε·softplus(βh)."""
    h = r.chosen - r.rejected
    return (1 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)


def robust_loss(r: PairLogps, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 4): an unbiased estimate of the clean DPO loss under flip rate ε,
    [(1−ε)·softplus(−βh) − ε·softplus(βh)] / (1−2ε)."""
    h = r.chosen - r.rejected
    return ((1 - eps) * F.softplus(-beta * h) - eps * F.softplus(beta * h)) / (1 - 2 * eps)


def ipo_sum_loss(r: PairLogps, beta: float, eps: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17, τ ≡ β) on summed log-ratios: (h − 1/(2β))²."""
    return (r.chosen - r.rejected - 1 / (2 * beta)) ** 2


def ipo_mean_loss(r: PairLogps, beta: float, eps: float) -> torch.Tensor:
    """IPO Eq. 17 on per-token mean log-ratios (TRL, oat; "confirmed with the IPO authors"):
    (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²."""
    return (r.chosen_mean - r.rejected_mean - 1 / (2 * beta)) ** 2


VARIANTS: dict[str, Callable[[PairLogps, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "ipo_sum": ipo_sum_loss,
    "ipo_mean": ipo_mean_loss,
}
USES_EPSILON = ("cdpo", "robust")


def check_beta(beta: float) -> None:
    check(isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0, f"beta must be a positive number, got {beta!r}")


def check_label_smoothing(eps: float) -> None:
    check(isinstance(eps, (int, float)) and 0.0 <= eps < 0.5,
          f"label_smoothing must lie in [0, 0.5) (an assumed label-flip rate), got {eps!r}")


@dataclass
class DPOOptions:
    beta: float = 0.1  # β: strength of the KL leash to π_ref (IPO's τ); DPO paper default 0.1
    variant: str = "sigmoid"  # sigmoid | cdpo | robust | ipo_sum | ipo_mean (see losses/dpo.py)
    label_smoothing: float = 0.0  # ε in [0, 0.5): assumed label-flip rate, used by cdpo and robust only

    def validate(self) -> None:
        check_beta(self.beta)
        if self.variant == "ipo":
            check(False, "variant 'ipo' is ambiguous: choose 'ipo_mean' (per-token mean log-ratios, as TRL and oat) "
                         "or 'ipo_sum' (summed log-ratios, as eric-mitchell's DPO repo and OpenRLHF)")
        check(self.variant in VARIANTS, f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        check_label_smoothing(self.label_smoothing)
        check(self.label_smoothing == 0.0 or self.variant in USES_EPSILON,
              f"label_smoothing={self.label_smoothing} has no effect on variant '{self.variant}'; it is used by "
              f"{' and '.join(USES_EPSILON)} only (TRL's sigmoid no longer smooths: use variant cdpo)")


@register("dpo")
class DPO(Loss):
    """Direct Preference Optimization (Rafailov et al. 2023) and its cDPO / robust / IPO variants."""

    Options = DPOOptions
    needs = frozenset({"pairs", "ref_logprobs"})

    def __init__(self, options=None):
        super().__init__(options)
        self.variant_fn = VARIANTS[self.opt.variant]

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """(B, T) per-token log-probs of the realised tokens under π_ref (constants)."""
        ref = batch.extras.get("ref_logprobs")
        if ref is None:
            raise ValueError(f"loss '{self.name}' needs batch.extras['ref_logprobs'] (B, T); the trainer fills it, "
                             "code of your own must pass it (or use dpo_ref_free)")
        return ref.detach()

    def __call__(self, logprobs, batch, ctx):
        policy = pair_logps(logprobs, batch, self.name)  # (P,) sums and lengths
        ref = pair_logps(self.reference_logps(batch).to(logprobs.dtype), batch, self.name)
        ratios = PairLogps(chosen=policy.chosen - ref.chosen, rejected=policy.rejected - ref.rejected,
                           chosen_len=policy.chosen_len, rejected_len=policy.rejected_len)
        per_pair = self.variant_fn(ratios, self.opt.beta, self.opt.label_smoothing)  # (P,)
        loss = ctx.sequence_mean(per_pair, rows_per_item=2)  # mean over the optimizer batch's pairs
        beta = self.opt.beta
        return loss, reward_metrics(beta * ratios.chosen, beta * ratios.rejected, policy)


@register("dpo_ref_free")
class DPORefFree(DPO):
    """DPO with a uniform reference (log π_ref ≡ 0): no reference model. Same variants as dpo."""

    needs = frozenset({"pairs"})

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=batch.loss_mask.device)
