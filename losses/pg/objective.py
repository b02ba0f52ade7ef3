"""The unified KL-regularised policy-gradient objective (LOSSES.md §6.3), assembled from small pieces.

For token t of completion i (loss mask m), minimise the aggregate of

    ℓ_{i,t} = PG_{i,t}(θ) + β · C_{i,t} · K(s_{i,t} − s^ref_{i,t})

* Â — ``advantage`` (losses/pg/advantages.py), computed once per experience batch in ``prepare`` from the rewards,
  optionally shaped by a KL penalty in the reward, β_rew·K_rew(s^old − s^ref) (``reward_kl``, ``reward_beta``).
* PG — ``policy`` (losses/pg/policy.py): PPO clip (token or sequence ratio), REINFORCE, IS-REINFORCE, RPG-REINFORCE.
* K — ``kl`` (losses/pg/kl.py): k1/k2/k3/k3+ or an RPG surrogate, against the fixed π_ref (``reference: fixed``) or
  π_old (``reference: iterative``, RPG); C = 1 or the non-detached token ratio ρ (``kl_weight: ratio``: RPG's
  correction, TRL ``use_bias_correction_kl``). With an RPG-REINFORCE policy the KL sits in the REINFORCE weight.
* Aggregation — the shared ``ctx.reduce`` (A1–A5); a sequence-level ratio averages over sequences (TRL RLOO).

Stop-gradients: Â, s^old, s^ref and the reward are constants; the ratio and the KL-in-loss term carry gradients.
The named methods (grpo.py, dr_grpo.py, rloo.py, reinforce_pp.py, rpg.py) are this class with the pieces and
defaults of the paper they reproduce; every option stays open to them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..base import Loss, LossContext, check
from ..batch import Batch
from ..options import AggregationOption, ReuseOptions
from ..reduce import masked_mean
from ..registry import register
from . import policy as pg
from .advantages import ESTIMATORS, OUTCOME_ESTIMATORS
from .kl import LOSS_KL, REWARD_KL, RPG_KL, k3

REWARD_KEY = "reward"  # batch.extras[REWARD_KEY]: (B,) one scalar reward per completion, filled by the rollout source

AdvantageName = Literal["group_norm", "group_mean", "rloo", "batch_mean", "reinforce", "reinforce_baseline"]
PolicyName = Literal["ppo_clip", "seq_ppo_clip", "reinforce", "is_reinforce", "rpg_reinforce", "rpg_reinforce_clip"]
KLName = Literal["none", "k1", "k2", "k3", "k3+", "rpg_fkl", "rpg_rkl", "rpg_ufkl", "rpg_urkl"]
RewardKLName = Literal["none", "k1", "k2", "k3"]
ReferenceName = Literal["fixed", "iterative"]
KLWeightName = Literal["one", "ratio"]


@dataclass
class KLPGOptions(ReuseOptions, AggregationOption):
    advantage: AdvantageName = "group_norm"  # Â: group_norm (GRPO), group_mean, rloo, batch_mean, reinforce(_baseline)
    std_eps: float = 1e-4  # ε of group_norm's (R − μ_g)/(σ_g + ε): TRL 1e-4, verl 1e-6
    reward_kl: RewardKLName = "none"  # KL in the reward, K(s_old − s_ref): summed (outcome Â), per token (reinforce*)
    reward_beta: float = 0.0  # β_rew, the coefficient of the KL in the reward
    policy: PolicyName = "ppo_clip"  # ppo_clip, seq_ppo_clip (TRL RLOO), reinforce, is_reinforce, rpg_reinforce(_clip)
    epsilon_low: float = 0.2  # clip range below: ρ ≥ 1 − epsilon_low
    epsilon_high: float = 0.2  # clip range above: ρ ≤ 1 + epsilon_high (DAPO / RPG: 0.28)
    dual_clip: float | None = None  # dual clip c > 1: for Â < 0 the loss is at most −cÂ (RPG 10); null = off
    kl: KLName = "k3"  # KL in the loss: k1, k2, k3, k3+, rpg_fkl/rkl/ufkl/urkl (the weight of rpg_reinforce*)
    beta: float = 0.0  # β of the KL in the loss (0: no KL term, no reference model)
    kl_weight: KLWeightName = "one"  # C: one (GRPO) or ratio = non-detached ρ (RPG; TRL use_bias_correction_kl)
    reference: ReferenceName = "fixed"  # KL-in-loss reference: fixed = π_ref (initial model), iterative = π_old (RPG)
    max_completion_length: int | None = None  # T_max of token_sum_norm (A5, Dr. GRPO); null = the data max_length

    @property
    def rpg_policy(self) -> bool:
        """An RPG-REINFORCE policy term, which carries the KL in its REINFORCE weight."""
        return self.policy.startswith("rpg_reinforce")

    @property
    def kl_in_loss(self) -> bool:
        """β·C·K is a term of the loss."""
        return self.beta > 0 and self.kl != "none" and not self.rpg_policy

    @property
    def kl_in_reward(self) -> bool:
        """β_rew·K(s_old − s_ref) shapes the reward."""
        return self.reward_beta > 0 and self.reward_kl != "none"

    def validate(self) -> None:
        for name in ("std_eps", "beta", "reward_beta", "epsilon_high"):
            check(getattr(self, name) >= 0, f"{name} must be ≥ 0, got {getattr(self, name)}")
        check(0 <= self.epsilon_low < 1, f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        check(self.dual_clip is None or self.dual_clip > 1,
              f"dual_clip must be > 1 (or null for no dual clip), got {self.dual_clip}")
        check(self.max_completion_length is None or self.max_completion_length > 0,
              f"max_completion_length must be > 0 (or null), got {self.max_completion_length}")
        check(not (self.beta > 0 and self.kl == "none"), f"beta = {self.beta} but kl is 'none'; pick a KL term "
              "(k3 for GRPO) or set beta: 0")
        check(not (self.reward_beta > 0 and self.reward_kl == "none"),
              f"reward_beta = {self.reward_beta} but reward_kl is 'none'; pick k1 (RLOO, REINFORCE++) or set "
              "reward_beta: 0")
        check(not (self.kl in RPG_KL and self.kl_weight == "ratio"),
              f"kl {self.kl!r} already carries the ratio w = π_θ/π_ref; use kl_weight: one")
        if self.rpg_policy:
            check(self.kl in RPG_KL, f"policy {self.policy!r} puts the KL in the REINFORCE weight; kl must be one "
                  f"of {', '.join(RPG_KL)}, got {self.kl!r}")
            check(self.reference == "iterative", f"policy {self.policy!r} uses π_old as the KL reference (RPG "
                  "Alg. 2); set reference: iterative")
        if self.policy == "seq_ppo_clip":
            check(self.advantage in OUTCOME_ESTIMATORS, f"policy 'seq_ppo_clip' needs one advantage per "
                  f"sequence ({', '.join(OUTCOME_ESTIMATORS)}), got {self.advantage!r}")
        if self.reference == "iterative" and self.kl_in_loss:
            check(self.epochs * self.minibatches > 1, "reference: iterative takes π_old as the KL reference, and "
                  "with epochs = minibatches = 1 every step is on-policy (π_θ = π_old), so the KL term has zero "
                  "gradient; set minibatches > 1 or epochs > 1 (RPG: 16 steps per rollout batch), or reference: fixed")


# Policy terms under one signature: (s, s_old, Â, mask, options) -> PolicyTerm.
POLICIES: dict[str, Callable[..., pg.PolicyTerm]] = {
    "ppo_clip": lambda s, old, a, m, o: pg.ppo_clip(s, old, a, o.epsilon_low, o.epsilon_high, o.dual_clip),
    "seq_ppo_clip": lambda s, old, a, m, o: pg.sequence_ppo_clip(s, old, a, m, o.epsilon_low, o.epsilon_high),
    "reinforce": lambda s, old, a, m, o: pg.reinforce(s, old, a),
    "is_reinforce": lambda s, old, a, m, o: pg.is_reinforce(s, old, a, o.epsilon_low, o.epsilon_high),
    "rpg_reinforce": lambda s, old, a, m, o: pg.rpg_reinforce(s, old, a, o.kl, o.beta, o.epsilon_low,
                                                              o.epsilon_high),
    "rpg_reinforce_clip": lambda s, old, a, m, o: pg.rpg_reinforce_clip(s, old, a, o.kl, o.beta, o.epsilon_low,
                                                                        o.epsilon_high, o.dual_clip),
}


def needs_for(opt: KLPGOptions) -> frozenset[str]:
    """What the trainer must provide: rewards and π_old always; π_ref only when a KL against it is used."""
    needs = {"rewards", "old_logprobs"}
    if (opt.kl_in_loss and opt.reference == "fixed") or opt.kl_in_reward:
        needs.add("ref_logprobs")
    return frozenset(needs)


def checked_rewards(batch: Batch, loss_name: str) -> torch.Tensor:
    """(B,) fp32 ``extras["reward"]``: one finite reward per completion, or a one-line error naming the rows."""
    rewards = batch.extras.get(REWARD_KEY)
    if rewards is None or rewards.dim() != 1 or rewards.shape[0] != len(batch):
        got = "nothing" if rewards is None else f"shape {tuple(rewards.shape)}"
        raise ValueError(f"loss '{loss_name}' needs batch.extras['{REWARD_KEY}'] of shape ({len(batch)},): one "
                         f"scalar reward per completion, from a rollout source; got {got}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()[:10]
    if len(bad):
        index = batch.extras.get("index")
        rows = f" (dataset rows {index[bad].tolist()})" if index is not None else ""
        raise ValueError(f"loss '{loss_name}': batch.extras['{REWARD_KEY}'] is NaN/inf at rows {bad.tolist()}"
                         f"{rows}; every completion needs a finite reward: check the reward function")
    return rewards.to(torch.float32)


@register("kl_pg")
class KLPG(Loss):
    """KL-regularised policy gradient, every piece an option (LOSSES.md §6.3): advantage, policy term, KL placement.

    The method's pieces, each a method a reader (or a subclass) finds by name: ``advantages`` (Â, once per
    experience batch), ``policy_term`` (PG_{i,t}) and ``kl_term`` (C·K), reduced by ``ctx.reduce``.
    """

    Options = KLPGOptions
    needs = needs_for(KLPGOptions())
    extra_needs: frozenset[str] = frozenset()  # what a subclass needs beyond the pieces (e.g. reference rewards)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.needs = needs_for(cls.Options()) | cls.extra_needs  # what `align losses` shows: the defaults' needs

    def __init__(self, options=None):
        super().__init__(options)
        self.needs = needs_for(self.opt) | self.extra_needs  # this run's: no reference model when no KL uses it

    @property
    def prepare_needs(self) -> frozenset[str]:
        """prepare reads the rewards, and π_old / π_ref only for a KL penalty in the reward."""
        if self.opt.kl_in_reward:
            return frozenset({"rewards", "old_logprobs", "ref_logprobs"} & self.needs)
        return frozenset({"rewards"})

    # ------------------------------------------------------------------------------------------ the pieces
    def advantages(self, batch: Batch) -> torch.Tensor:
        """Â (B, T) from the rewards (B,), ``group_ids`` and the KL penalty in the reward β_rew·K(s_old − s_ref)."""
        opt = self.opt
        rewards = checked_rewards(batch, self.name)
        penalty = None
        if opt.kl_in_reward:
            old, ref = batch.extras["old_logprobs"], batch.extras["ref_logprobs"]
            penalty = opt.reward_beta * REWARD_KL[opt.reward_kl](old, ref).to(torch.float32)  # (B, T)
        return ESTIMATORS[opt.advantage](rewards, batch.group_ids, batch.loss_mask, penalty, opt.std_eps)

    def policy_term(self, logprobs: torch.Tensor, batch: Batch) -> pg.PolicyTerm:
        """PG_{i,t}(θ) (B, T) against π_old, with the constant Â."""
        if "advantages" not in batch.extras:
            raise RuntimeError(f"loss '{self.name}': batch.extras has no 'advantages'; call loss.prepare(batch, ctx) "
                               "on the experience batch first")
        old, adv = batch.extras["old_logprobs"], batch.extras["advantages"]
        return POLICIES[self.opt.policy](logprobs, old, adv, batch.loss_mask, self.opt)

    def kl_term(self, logprobs: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """C·K(s − s^ref) (B, T) against π_ref (fixed) or π_old (iterative); None when the loss has no KL term."""
        opt = self.opt
        if not opt.kl_in_loss:
            return None
        old = batch.extras["old_logprobs"]
        ref = batch.extras["ref_logprobs"] if opt.reference == "fixed" else old
        kl_value = LOSS_KL[opt.kl](logprobs, ref)  # (B, T)
        if opt.kl_weight == "ratio":
            kl_value = kl_value * pg.log_ratio(logprobs, old).exp()  # C = ρ, differentiable
        return kl_value

    # ------------------------------------------------------------------------------------------ per experience
    def prepare(self, batch: Batch, ctx: LossContext) -> Batch:
        """Â (B, T) into ``batch.extras["advantages"]``, from ``extras["reward"]`` (B,) and ``group_ids``."""
        advantages = self.advantages(batch).to(torch.float32)
        return dataclasses.replace(batch, extras={**batch.extras, "advantages": advantages})

    # ------------------------------------------------------------------------------------------ per micro-batch
    def __call__(self, logprobs, batch, ctx):
        """agg(PG_{i,t}) + β·agg(C·K_{i,t}); a sequence-level PG term brings its own aggregation."""
        mask = batch.loss_mask
        if self.opt.max_completion_length is not None:
            ctx = dataclasses.replace(ctx, max_length=self.opt.max_completion_length)
        term = self.policy_term(logprobs, batch)
        loss = ctx.reduce(term.loss, mask, term.reduce or self.aggregation)
        kl_value = self.kl_term(logprobs, batch)
        if kl_value is not None:
            loss = loss + self.opt.beta * ctx.reduce(kl_value, mask, self.aggregation)
        return loss, self._metrics(logprobs.detach(), batch, term, kl_value)

    def _metrics(self, logp: torch.Tensor, batch: Batch, term: pg.PolicyTerm, kl_value) -> dict[str, float]:
        mask = batch.loss_mask
        adv = batch.extras["advantages"]
        n = mask.sum()
        adv_mean = masked_mean(adv, mask)
        ratio_on_mask = torch.where(mask, term.ratio, torch.full_like(term.ratio, -float("inf")))
        metrics = {
            "pg_loss": masked_mean(term.loss.detach(), mask).item(),
            "clip_frac": masked_mean(term.clipped.to(logp.dtype), mask).item(),
            "ratio_mean": masked_mean(term.ratio, mask).item(),
            "ratio_max": ratio_on_mask.max().item() if n > 0 else 1.0,
            "adv_mean": adv_mean.item(),
            "adv_std": masked_mean((adv - adv_mean).square(), mask).sqrt().item(),
            "kl_old": masked_mean(k3(logp, batch.extras["old_logprobs"]), mask).item(),  # drift from π_old
            "reward_mean": batch.extras[REWARD_KEY].float().mean().item(),
        }
        if "ref_logprobs" in batch.extras:
            metrics["kl_ref"] = masked_mean(k3(logp, batch.extras["ref_logprobs"]), mask).item()  # KL(π_θ‖π_ref)
        if kl_value is not None:
            metrics["kl_term"] = masked_mean(kl_value.detach(), mask).item()
        return metrics
