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
The named presets (losses/pg/presets.py) are this class with the defaults of the method they reproduce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch

from ..base import Loss, LossContext, check
from ..batch import Batch
from ..reduce import AGGREGATIONS, Aggregation, masked_mean
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
class KLPGOptions:
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
    aggregation: Aggregation = "token_mean"  # reduction of per-token terms, A1–A5 (losses/reduce.py)
    max_completion_length: int | None = None  # T_max of token_sum_norm (A5, Dr. GRPO); null = the data max_length
    epochs: int = 1  # passes over each experience batch (PPO epochs; TRL num_iterations)
    minibatches: int = 1  # optimizer steps per pass over train.batch_size × minibatches examples

    def validate(self) -> None:
        for name, tp in (("advantage", AdvantageName), ("policy", PolicyName), ("kl", KLName),
                         ("reward_kl", RewardKLName), ("kl_weight", KLWeightName),
                         ("reference", ReferenceName)):
            value = getattr(self, name)
            check(value in get_args(tp), f"{name} must be one of {', '.join(get_args(tp))}, got {value!r}")
        check(self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        check(self.std_eps >= 0, f"std_eps must be ≥ 0, got {self.std_eps}")
        check(self.beta >= 0, f"beta must be ≥ 0, got {self.beta}")
        check(self.reward_beta >= 0, f"reward_beta must be ≥ 0, got {self.reward_beta}")
        check(0 <= self.epsilon_low < 1, f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        check(self.epsilon_high >= 0, f"epsilon_high must be ≥ 0, got {self.epsilon_high}")
        check(self.dual_clip is None or self.dual_clip > 1,
              f"dual_clip must be > 1 (or null for no dual clip), got {self.dual_clip}")
        check(self.epochs >= 1 and self.minibatches >= 1,
              f"epochs and minibatches must be ≥ 1, got {self.epochs} and {self.minibatches}")
        check(self.max_completion_length is None or self.max_completion_length > 0,
              f"max_completion_length must be > 0 (or null), got {self.max_completion_length}")
        check(not (self.beta > 0 and self.kl == "none"), f"beta = {self.beta} but kl is 'none'; pick a KL term "
              "(k3 for GRPO) or set beta: 0")
        check(not (self.reward_beta > 0 and self.reward_kl == "none"),
              f"reward_beta = {self.reward_beta} but reward_kl is 'none'; pick k1 (RLOO, REINFORCE++) or set "
              "reward_beta: 0")
        check(not (self.kl in RPG_KL and self.kl_weight == "ratio"),
              f"kl {self.kl!r} already carries the ratio w = π_θ/π_ref; use kl_weight: one")
        if self.policy.startswith("rpg_reinforce"):
            check(self.kl in RPG_KL, f"policy {self.policy!r} puts the KL in the REINFORCE weight; kl must be one "
                  f"of {', '.join(RPG_KL)}, got {self.kl!r}")
            check(self.reference == "iterative", f"policy {self.policy!r} uses π_old as the KL reference (RPG "
                  "Alg. 2); set reference: iterative")
        if self.policy == "seq_ppo_clip":
            check(self.advantage in OUTCOME_ESTIMATORS, f"policy 'seq_ppo_clip' needs one advantage per "
                  f"sequence ({', '.join(OUTCOME_ESTIMATORS)}), got {self.advantage!r}")
        if self.reference == "iterative" and self.beta > 0 and not self.policy.startswith("rpg_reinforce"):
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
    kl_in_loss = opt.beta > 0 and opt.kl != "none" and not opt.policy.startswith("rpg_reinforce")
    if (kl_in_loss and opt.reference == "fixed") or (opt.reward_beta > 0 and opt.reward_kl != "none"):
        needs.add("ref_logprobs")
    return frozenset(needs)


@register("kl_pg")
class KLPG(Loss):
    """KL-regularised policy gradient, every piece an option (LOSSES.md §6.3): advantage, policy term, KL placement."""

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
        if self.opt.reward_beta > 0 and self.opt.reward_kl != "none":
            return frozenset({"rewards", "old_logprobs", "ref_logprobs"} & self.needs)
        return frozenset({"rewards"})

    # ------------------------------------------------------------------------------------------ per experience
    def prepare(self, batch: Batch, ctx: LossContext) -> Batch:
        """Â (B, T) into ``batch.extras["advantages"]``, from ``extras["reward"]`` (B,) and ``group_ids``."""
        opt = self.opt
        rewards = batch.extras.get(REWARD_KEY)
        if rewards is None or rewards.dim() != 1 or rewards.shape[0] != len(batch):
            got = "nothing" if rewards is None else f"shape {tuple(rewards.shape)}"
            raise ValueError(f"loss '{self.name}' needs batch.extras['{REWARD_KEY}'] of shape ({len(batch)},): one "
                             f"scalar reward per completion, from a rollout source; got {got}")
        bad = (~torch.isfinite(rewards)).nonzero().flatten()[:10]
        if len(bad):
            index = batch.extras.get("index")
            rows = f" (dataset rows {index[bad].tolist()})" if index is not None else ""
            raise ValueError(f"loss '{self.name}': batch.extras['{REWARD_KEY}'] is NaN/inf at rows {bad.tolist()}"
                             f"{rows}; every completion needs a finite reward: check the reward function")
        mask = batch.loss_mask
        rewards = rewards.to(torch.float32)
        penalty = None
        if opt.reward_beta > 0 and opt.reward_kl != "none":
            old, ref = batch.extras["old_logprobs"], batch.extras["ref_logprobs"]
            penalty = opt.reward_beta * REWARD_KL[opt.reward_kl](old, ref).to(torch.float32)  # (B, T)
        advantages = ESTIMATORS[opt.advantage](rewards, batch.group_ids, mask, penalty, opt.std_eps)
        return dataclasses.replace(batch, extras={**batch.extras, "advantages": advantages.to(torch.float32)})

    # ------------------------------------------------------------------------------------------ per micro-batch
    def __call__(self, logprobs, batch, ctx):
        opt = self.opt
        mask = batch.loss_mask
        if "advantages" not in batch.extras:
            raise RuntimeError(f"loss '{self.name}': batch.extras has no 'advantages'; call loss.prepare(batch, ctx) "
                               "on the experience batch first")
        adv = batch.extras["advantages"]
        old = batch.extras["old_logprobs"]
        if opt.max_completion_length is not None:
            ctx = dataclasses.replace(ctx, max_length=opt.max_completion_length)

        term = POLICIES[opt.policy](logprobs, old, adv, mask, opt)
        loss = ctx.reduce(term.loss, mask, term.reduce or self.aggregation)
        kl_value = None
        if opt.beta > 0 and opt.kl != "none" and not opt.policy.startswith("rpg_reinforce"):
            ref = batch.extras["ref_logprobs"] if opt.reference == "fixed" else old
            kl_value = LOSS_KL[opt.kl](logprobs, ref)  # (B, T)
            if opt.kl_weight == "ratio":
                kl_value = kl_value * pg.log_ratio(logprobs, old).exp()  # C = ρ, differentiable
            loss = loss + opt.beta * ctx.reduce(kl_value, mask, self.aggregation)
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
