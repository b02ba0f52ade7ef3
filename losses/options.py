"""Options that several losses share, declared once and checked when an Options dataclass is built.

A loss's Options dataclass inherits the pieces it takes::

    @dataclass
    class PSFTOptions(ReuseOptions, AggregationOption):
        eps_high: float = 0.28  # one comment per field
        minibatches: int = 8    # a shared option with this loss's own default (and comment)

* :class:`CheckedOptions`, the root: every field typed with a ``Literal`` must hold one of its values (``aggregation``,
  and a loss's own names such as ``advantage`` or ``quantile``); a field re-declared with a narrower ``Literal``
  narrows the check.
* :class:`AggregationOption`: ``aggregation``, the reduction of per-token terms (losses/reduce.py, A1–A5).
* :class:`ReuseOptions`: ``epochs`` × ``minibatches`` optimizer steps per experience batch, both whole numbers ≥ 1.

Checks that tie several fields together stay in the loss's own ``validate`` (run by ``Loss.__init__``). A subclass
with its own ``__post_init__`` calls ``super().__post_init__()``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

from .base import check
from .reduce import Aggregation


@functools.lru_cache(maxsize=None)
def literal_fields(cls: type) -> dict[str, tuple]:
    """{field name: allowed values} of the dataclass's fields typed ``Literal[...]`` (the most derived type wins)."""
    hints = typing.get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if get_origin(hints.get(f.name)) is Literal}


@dataclass
class CheckedOptions:
    """Root of an Options dataclass that checks its ``Literal`` fields when it is built."""

    def __post_init__(self) -> None:
        for name, allowed in literal_fields(type(self)).items():
            value = getattr(self, name)
            check(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class AggregationOption(CheckedOptions):
    aggregation: Aggregation = "token_mean"  # how per-token losses become one number (losses/reduce.py, A1–A5)


@dataclass
class ReuseOptions(CheckedOptions):
    epochs: int = 1  # passes over each experience batch (PPO epochs; TRL num_iterations)
    minibatches: int = 1  # optimizer steps per pass over train.batch_size × minibatches examples

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatches"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"{name} must be a whole number >= 1, got {v!r}")
        super().__post_init__()
