"""The shared option mixins of losses/options.py: every loss that takes `aggregation`, `epochs` or `minibatches` gets
them (and their one check) from there, and the check runs when the Options dataclass is built."""

import dataclasses

import pytest

import losses
from losses import OptionError
from losses.options import AggregationOption, ReuseOptions


def _field_names(cls):
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


@pytest.mark.parametrize("name", sorted(losses.registered()))
def test_shared_options_come_from_the_mixins(name):
    options = losses.get_loss_class(name).Options
    fields = _field_names(options)
    assert ("aggregation" in fields) == issubclass(options, AggregationOption), name
    assert bool({"epochs", "minibatches"} & fields) == issubclass(options, ReuseOptions), name


@pytest.mark.parametrize("name, options, message", [
    ("sft", dict(aggregation="mean"), "aggregation must be one of token_mean, micro_token_mean"),
    ("asft", dict(aggregation="sum"), "aggregation must be one of token_mean"),
    ("kl_pg", dict(epochs=True), "epochs must be a whole number >= 1, got True"),
    ("grpo", dict(minibatches=1.5), "minibatches must be a whole number >= 1, got 1.5"),
    ("bond", dict(quantile="p_le"), "quantile must be one of bon_ratio, log_p_le, got 'p_le'"),
    # J-BOND narrows the shared `aggregation` (and has its own advantage names): the narrower Literal is checked
    ("jbond", dict(aggregation="token_mean"), "aggregation must be one of seq_mean_token_sum, seq_mean_token_mean"),
    ("jbond", dict(advantage="group_norm"), "advantage must be one of batch_mean, group_mean, rloo"),
])
def test_options_check_themselves_when_built(name, options, message):
    cls = losses.get_loss_class(name).Options
    with pytest.raises(OptionError, match=message):
        cls(**options)
    with pytest.raises(OptionError, match=message):  # and again on replace (dataclasses.replace runs __post_init__)
        dataclasses.replace(cls(), **options)


def test_a_subclass_post_init_still_runs_the_shared_check():
    """BOND's Options derive reward_beta = 1/(N−1) in their own __post_init__, then chain to the mixins'."""
    cls = losses.get_loss_class("bond").Options
    assert cls(bon_n=5).reward_beta == 0.25
    with pytest.raises(OptionError, match="minibatches must be a whole number"):
        cls(bon_n=5, minibatches=0)
