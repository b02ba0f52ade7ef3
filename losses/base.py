"""The loss protocol: what a loss declares, what it receives, what it returns.

A loss is a small class::

    @register("my_loss")
    class MyLoss(Loss):
        @dataclass
        class Options:
            beta: float = 0.1          # one comment per field

        needs = frozenset({"ref_logprobs"})

        def __call__(self, logprobs, batch, ctx):
            per_token = ...            # (B, T)
            return ctx.reduce(per_token, batch.loss_mask), {"beta": self.opt.beta}

Options that several losses share (``aggregation``; ``epochs`` and ``minibatches`` for experience reuse) come from the
mixins of ``losses/options.py``, which also check every ``Literal`` field when the Options are built; checks that tie
fields together go in the Options' ``validate()``, which ``Loss.__init__`` calls.

The trainer never branches on a loss's name: it reads ``needs``, ``output``, ``epochs`` and ``minibatches``, fills
``batch.extras`` and calls ``prepare`` once per experience batch and ``__call__`` once per micro-batch.

``output`` says what the model computes for the loss, and so which model the trainer loads and saves: ``"logprobs"``
(the default: a causal LM, per-token log-probs) or ``"scores"`` (a sequence-classification model with one output, one
score per sequence: a reward model, ``losses/reward.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .batch import Batch
from .reduce import Aggregation, aggregate

# What a loss may declare in ``needs``; the trainer knows how to provide each.
NEEDS = {
    "ref_logprobs": "(B, T) log-probs of the realised tokens under the frozen reference policy",
    "old_logprobs": "(B, T) log-probs under the policy as it was when this experience batch was made",
    "ref_model": "a reference model kept in memory, for ctx.ref_kl() (full-vocabulary divergences)",
    "rewards": "(B,) per-sequence rewards: the experience must come from rollouts (a `rollout:` section)",
    "pairs": "rows 2i / 2i+1 are the chosen / rejected completions of pair i (preference data)",
    "reference_rewards": "(B,) `ref_below`, `ref_equal`, `ref_count`: how many of `reference_samples` samples of the "
                         "same prompt from the reference policy have a lower / equal reward (rollouts only)",
    "reference_best": "the best of those reference samples of every prompt, added to the batch as a row with "
                      "`reference_sample` = 1 (J-BOND's forward term)",
}


# What a loss may declare as ``output``: the first argument of ``__call__``; the trainer loads the matching model.
OUTPUTS = {
    "logprobs": "(B, T) fp32 log-probs of the realised tokens under a causal LM (AutoModelForCausalLM): a policy",
    "scores": "(B,) fp32 score per sequence from AutoModelForSequenceClassification(num_labels=1), read at the last "
              "non-pad token: a reward model",
}


class OptionError(ValueError):
    """A loss option has a value the loss cannot use."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise OptionError(message)


@dataclass
class LossContext:
    """What a loss may know beyond its micro-batch.

    Counts are over the whole *optimizer* batch (all micro-batches and all data-parallel ranks), so that reductions
    are the same however the batch is split.
    """

    num_tokens: float  # loss tokens in the optimizer batch
    num_sequences: float  # sequences (rows) in the optimizer batch
    num_micro_batches: int  # micro-batches in the optimizer batch, over all ranks
    max_length: int  # the configured maximum sequence length (T_max of the constant-normaliser mode)
    step: int = 0  # optimizer steps taken so far
    aggregation: Aggregation = "token_mean"  # the default reduction for per-token losses
    ref_kl_fn: Callable[[], torch.Tensor] | None = None  # set when the loss needs "ref_model"

    def reduce(self, per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation | None = None) -> torch.Tensor:
        """This micro-batch's share of the optimizer-batch loss (see ``losses.reduce``)."""
        return aggregate(per_token, mask, mode or self.aggregation, self)

    def sequence_mean(self, per_sequence: torch.Tensor, rows_per_item: int = 1) -> torch.Tensor:
        """This micro-batch's share of a mean over items (sequences, or pairs with ``rows_per_item=2``)."""
        return per_sequence.sum() / max(self.num_sequences / rows_per_item, 1.0)

    def ref_kl(self) -> torch.Tensor:
        """(B, T) exact KL(π_ref(·|c_t) ‖ π_θ(·|c_t)) over the full vocabulary at every loss position.

        Differentiable through π_θ only; computed in vocabulary-sized chunks so no (B, T, V) tensor is built.
        """
        if self.ref_kl_fn is None:
            raise RuntimeError("ctx.ref_kl() needs the loss to declare 'ref_model' in `needs`")
        return self.ref_kl_fn()


class Loss:
    """Base class of every loss. Subclasses set ``name`` (via ``@register``), ``Options`` and ``needs``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = dataclass(type("Options", (), {}))
    needs: ClassVar[frozenset[str]] = frozenset()
    output: ClassVar[str] = "logprobs"  # a key of OUTPUTS: what the model hands to __call__
    # The default reduction of this loss's per-token terms (LOSSES.md §0.1); a config may override it through an
    # `aggregation` option when the Options dataclass has one.
    default_aggregation: ClassVar[Aggregation] = "token_mean"

    def __init__(self, options: Any = None):
        self.opt = options if options is not None else self.Options()
        validate = getattr(self.opt, "validate", None)  # an Options dataclass checks its own values
        if validate is not None:
            validate()

    # -- experience reuse: PSFT / PPO-style losses take several optimizer steps per experience batch -------------
    @property
    def epochs(self) -> int:
        """Passes over each experience batch."""
        return int(getattr(self.opt, "epochs", 1))

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass (the experience batch is split into this many mini-batches)."""
        return int(getattr(self.opt, "minibatches", 1))

    # -- the reference policy: samples from it, and whether it moves ---------------------------------------------
    @property
    def reference_samples(self) -> int:
        """Samples per prompt from the reference policy, for losses that need ``reference_rewards``."""
        return int(getattr(self.opt, "reference_samples", 0))

    @property
    def reference_ema(self) -> float:
        """γ of a moving reference, θ_ref ← (1−γ)·θ_ref + γ·θ after every optimizer step (0: a fixed reference)."""
        return float(getattr(self.opt, "reference_ema", 0.0))

    @property
    def aggregation(self) -> Aggregation:
        return getattr(self.opt, "aggregation", None) or self.default_aggregation

    @property
    def prepare_needs(self) -> frozenset[str]:
        """The ``needs`` that ``prepare`` reads (default: all of them). When ``old_logprobs`` is not among them and
        each experience batch makes one optimizer step (epochs × minibatches = 1), the trainer takes π_old from that
        step's own forward (the same weights, detached) instead of a separate pass, and sets it on each micro-batch."""
        return frozenset(self.needs)

    def prepare(self, batch: Batch, ctx: LossContext) -> Batch:
        """Once per experience batch, after ``needs`` are filled, without gradients (e.g. advantages)."""
        return batch

    def __call__(
        self, logprobs: torch.Tensor, batch: Batch, ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``logprobs``: (B, T) fp32 log-probs of the realised tokens under π_θ, zero off ``loss_mask`` (for a loss
        with ``output = "scores"``: the (B,) fp32 scores of the sequences instead).

        Returns this micro-batch's share of the optimizer-batch loss (scalar, differentiable) and metrics (floats,
        read as means over this micro-batch's rows).
        """
        raise NotImplementedError


def options_fields(options_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls)) if dataclasses.is_dataclass(options_cls) else []
