"""Best-of-N arithmetic (LOSSES.md §7.1, §7.3, §7.4): the BoN distribution and the reference-quantile estimators.

Best-of-N of a reference policy π_ref draws N samples and keeps the one with the highest reward (ties: any of the
tied ones, uniformly). With p_≤(y) = P_{y'~π_ref}[r(y') ≤ r(y)] and p_<(y) = P[r(y') < r(y)] (BOND Theorem 1):

    π_BoN(y) = π_ref(y) · p_≤(y)^{N−1} · Σ_{i=1}^{N} [p_<(y)/p_≤(y)]^{i−1}
             = π_ref(y) · (p_≤^N − p_<^N) / (p_≤ − p_<)                       (the sum is geometric)

The last factor of the first line is the tie correction: it is N when no other sequence has y's reward and 1 when
every other sequence ties with y. For 0/1 verifiers ties are everything: a correct y has p_≤ = 1, p_< = 1 − p (p =
P(correct)), so π_BoN(y)/π_ref(y) = (1 − (1−p)^N)/p, not 1 — the approximation (N−1)·log p_≤ + log N is far off.

Estimators from k reference samples y'_1..y'_k ~ π_ref(·|x) of the same prompt, with b = #{j: r(y'_j) < r(y)} and
e = #{j: r(y'_j) = r(y)} (ties counted explicitly):

* ``add_one_quantiles`` (ours, documented in the README): count y itself as one more draw, in its own tie class,
  among k + 1: p̂_< = b/(k+1), p̂_≤ = (b + e + 1)/(k+1). Then p̂_≤ ≥ 1/(k+1) (never log 0) and
  p̂_≤ − p̂_< = (e+1)/(k+1) > 0 (the tie correction is always defined). Without ties it is the add-one rank of y.
  The unsmoothed BOND estimate (§7.3) is (b + e)/k.
* ``add_one_cdf`` (vBoN, rycolab/vbon ``calc_bon_reward``): F̂(r) = (1 + b)/(M + 1), a strict inequality.

Everything here is a function of rewards only: constants of the update (no gradient). ``reference_counts`` reads
(b, e, k) from a batch, where the rollout side puts them (``ref_below``, ``ref_equal``, ``ref_count``).
"""

from __future__ import annotations

import math

import torch

from .batch import Batch


def bon_log_ratio(p_lt: torch.Tensor, p_le: torch.Tensor, n: int) -> torch.Tensor:
    """log π_BoN(y)/π_ref(y) = (N−1)·log p_≤ + log Σ_{i=1}^{N} q^{i−1}, q = p_</p_≤ (BOND Thm. 1, LOSSES.md §7.1).

    ``p_lt`` < ``p_le`` elementwise, p_le > 0 (any shape). The geometric sum is (1 − q^N)/(1 − q), computed with
    log1p so that q = 0 (nothing below y) gives exactly 0.
    """
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}")
    p_le = p_le.to(torch.float64)
    q = p_lt.to(torch.float64) / p_le
    if bool(((q < 0) | (q >= 1)).any()):
        raise ValueError("bon_log_ratio needs 0 ≤ p_< < p_≤ (y's own reward level has positive probability)")
    return (n - 1) * p_le.log() + torch.log1p(-q.pow(n)) - torch.log1p(-q)


def level_probabilities(ref_probs: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (p_<, p_≤) of every outcome of a finite distribution ``ref_probs`` (K,) with ``rewards`` (K,)."""
    below = (rewards[None, :] < rewards[:, None]).to(ref_probs.dtype)  # (K, K): [y, y'] = r(y') < r(y)
    at_most = (rewards[None, :] <= rewards[:, None]).to(ref_probs.dtype)
    return below @ ref_probs, at_most @ ref_probs


def bon_distribution(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """π_BoN over a finite set of outcomes (K,), from the §7.1 formula (ties shared uniformly within a level)."""
    p_lt, p_le = level_probabilities(ref_probs.to(torch.float64), rewards)
    support = ref_probs > 0
    out = torch.zeros_like(p_le)
    out[support] = ref_probs.to(torch.float64)[support] * bon_log_ratio(p_lt[support], p_le[support], n).exp()
    return out


def bon_kl(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> float:
    """KL(π_BoN ‖ π_ref) of a finite distribution: E_{π_BoN}[log π_BoN/π_ref] (≤ log N − (N−1)/N, Beirami et al.)."""
    p_lt, p_le = level_probabilities(ref_probs.to(torch.float64), rewards)
    support = ref_probs > 0
    log_ratio = bon_log_ratio(p_lt[support], p_le[support], n)
    bon = ref_probs.to(torch.float64)[support] * log_ratio.exp()
    return float((bon * log_ratio).sum())


def add_one_quantiles(below: torch.Tensor, equal: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p̂_<, p̂_≤) = (b/(k+1), (b+e+1)/(k+1)) from reference counts b (below), e (equal), k (count); any shape."""
    below, equal, count = (x.to(torch.float64) for x in (below, equal, count))
    return below / (count + 1), (below + equal + 1) / (count + 1)


def add_one_cdf(below: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """vBoN's F̂(r) = (1 + #{r_j < r})/(M + 1) (rycolab/vbon, LOSSES.md §7.4); any shape."""
    return (below.to(torch.float64) + 1) / (count.to(torch.float64) + 1)


COUNT_KEYS = ("ref_below", "ref_equal", "ref_count")  # per-sequence extras filled by the rollout side


def reference_counts(batch: Batch, loss_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, e, k), each (B,) fp64: reference samples of the row's prompt with a lower / equal reward, and how many."""
    missing = [k for k in COUNT_KEYS if k not in batch.extras]
    if missing:
        raise ValueError(f"loss '{loss_name}' needs batch.extras {list(COUNT_KEYS)} (how the sample's reward ranks "
                         f"among reference samples of its prompt); missing {missing}. The trainer fills them for a loss "
                         "that declares needs 'reference_rewards' in a `rollout:` run")
    below, equal, count = (batch.extras[k].to(torch.float64) for k in COUNT_KEYS)
    if bool((count < 1).any()) or bool((below + equal > count).any()):
        raise ValueError(f"loss '{loss_name}': reference counts are inconsistent (need count ≥ 1 and below + equal ≤ "
                         "count)")
    return below, equal, count


def bon_kl_bound(n: int) -> float:
    """log N − (N−1)/N: the KL(π_BoN ‖ π_ref) of continuous rewards, an upper bound otherwise (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def expected_best_of_n(rewards: list[float], n: int) -> float:
    """E[max of n draws] estimated without bias from m ≥ n i.i.d. rewards of one prompt (n draws without replacement
    from the m: with r_(1) ≤ … ≤ r_(m), Σ_i r_(i)·C(i−1, n−1)/C(m, n)). For 0/1 rewards it is the pass@n estimator."""
    m = len(rewards)
    if not 1 <= n <= m:
        raise ValueError(f"need 1 ≤ n ≤ the number of samples, got n = {n}, {m} samples")
    ordered = sorted(rewards)
    total = math.comb(m, n)
    return sum(r * math.comb(i, n - 1) for i, r in enumerate(ordered)) / total
