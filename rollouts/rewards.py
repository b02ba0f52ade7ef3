"""Reward functions: rule-based verifiers, a reward model and user functions, all with one batched signature::

    reward(prompts: list[str], completions: list[str], **fields: list) -> list[float]      # or `async def`

``fields`` are the dataset's other columns for each sample (``answer`` for the verifiers below; ``prompt_messages``
when the prompts were chat messages). A function that does not take ``**fields`` gets only the columns it names.
A user's function is named ``package.module:function`` in the config and imported only then. Built-ins are
factories registered with ``@reward(name)``: ``factory(**options) -> reward function`` (``align rewards`` lists
them). Running them — batching, deadlines, errors, weights — is ``rollouts/scoring.py``.
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


@reward("regex")
def regex(pattern: str, field: str | None = None, fullmatch: bool = False, flags: str = "") -> RewardFn:
    """1.0 when `pattern` is found in the completion (the whole completion with `fullmatch`). With `field`, the match
    (its first group, if the pattern has groups) must also equal that column after normalisation. `flags`: letters
    of i (ignore case), m (multi-line), s (dot matches newline)."""
    bits = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}
    bad = set(flags) - set(bits)
    if bad:
        raise ValueError(f"regex reward: unknown flag(s) {''.join(sorted(bad))!r}; use letters of 'ims'")
    try:
        rx = re.compile(pattern, sum(bits[f] for f in set(flags)))
    except re.error as e:
        raise ValueError(f"regex reward: pattern {pattern!r} does not compile: {e}") from None

    def fn(prompts, completions, **fields):
        answers = _answers(fields, len(completions), field) if field else [None] * len(completions)
        out = []
        for c, a in zip(completions, answers):
            m = rx.fullmatch(c) if fullmatch else rx.search(c)
            if m is None:
                out.append(0.0)
            elif field is None:
                out.append(1.0)
            else:
                got = m.group(1) if rx.groups else m.group(0)
                out.append(float(got is not None and normalize(got) == normalize(a)))
        return out

    return fn


@reward("math")
def math_answer(field: str = "answer") -> RewardFn:
    """1.0 when the completion's final answer is mathematically equal to the answer column (math-verify: LaTeX or
    plain expressions, e.g. \\boxed{\\frac{1}{2}} equals 0.5). Needs `pip install math-verify`."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("the 'math' reward needs math-verify: pip install math-verify (or the `math` extra: "
                         "pip install -e \".[math]\")") from None

    def fn(prompts, completions, **fields):
        answers = _answers(fields, len(completions), field)
        out = []
        for c, a in zip(completions, answers):
            # math-verify's own timeouts use signal.alarm (main thread only); rollouts/scoring.py enforces the deadline
            gold = parse(str(a), parsing_timeout=None)
            pred = parse(str(c), parsing_timeout=None)
            out.append(float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)))
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


def describe_rewards() -> str:
    """The built-in rewards with their options and defaults (for ``align rewards``)."""
    import inspect

    blocks = []
    for name, factory in registered_rewards().items():
        doc = " ".join((inspect.getdoc(factory) or "").split())
        lines = [f"{name}: {doc}"]
        for p in inspect.signature(factory).parameters.values():
            default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
            lines.append(f"    {p.name} = {default}")
        blocks.append("\n".join(lines))
    blocks.append("your own: name: package.module:function  (reward(prompts, completions, **fields) -> list[float], "
                  "may be async; with options it is a factory called with them)")
    return "\n\n".join(blocks)


from . import reward_model as _reward_model  # noqa: E402,F401  (registers "reward_model"; torch/transformers load lazily)
