"""Reward functions: rule-based verifiers and user functions, all with one batched signature::

    reward(prompts: list[str], completions: list[str], **fields: list) -> list[float]

``fields`` are the dataset's other columns for each sample (``answer`` for the verifiers below).
A user's function is named ``package.module:function`` in the config and imported only then.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

RewardFn = Callable[..., list[float]]

_REWARDS: dict[str, Callable[..., RewardFn]] = {}


def reward(name: str):
    """Register a reward factory: ``factory(**options) -> RewardFn``."""

    def deco(factory):
        _REWARDS[name] = factory
        return factory

    return deco


def registered_rewards() -> dict[str, Callable[..., RewardFn]]:
    return dict(sorted(_REWARDS.items()))


def normalize(text: str) -> str:
    return " ".join(str(text).strip().split()).lower()


def _answers(fields: dict, n: int, field: str) -> list:
    if field not in fields:
        raise KeyError(f"this reward compares against the dataset column {field!r}, which the prompts do not have")
    values = fields[field]
    if len(values) != n:
        raise ValueError(f"column {field!r} has {len(values)} values for {n} completions")
    return values


@reward("exact_match")
def exact_match(field: str = "answer") -> RewardFn:
    """1.0 when the completion equals the answer after trimming, case-folding and collapsing white space."""

    def fn(prompts, completions, **fields):
        answers = _answers(fields, len(completions), field)
        return [float(normalize(c) == normalize(a)) for c, a in zip(completions, answers)]

    return fn


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@reward("numeric_match")
def numeric_match(field: str = "answer", tolerance: float = 1e-6) -> RewardFn:
    """1.0 when the last number in the completion equals the answer's number within ``tolerance``."""

    def fn(prompts, completions, **fields):
        answers = _answers(fields, len(completions), field)
        out = []
        for c, a in zip(completions, answers):
            got, want = last_number(c), last_number(a)
            out.append(float(got is not None and want is not None and abs(got - want) <= tolerance))
        return out

    return fn


def load_reward(name: str, options: dict | None = None) -> RewardFn:
    """A built-in reward by name, or ``package.module:function`` (a RewardFn, or a factory when options are given)."""
    options = options or {}
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({e})") from e
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ValueError(f"reward {name!r}: {module_name!r} has no callable {attr!r}")
        return fn(**options) if options else fn
    if name not in _REWARDS:
        import difflib

        close = difflib.get_close_matches(name, list(_REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint} Built-in: {', '.join(sorted(_REWARDS))}; "
                         "or name your own as 'package.module:function'")
    try:
        return _REWARDS[name](**options)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: bad options {options}: {e}") from None
