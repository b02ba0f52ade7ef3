"""Running reward functions on a batch of rollouts: deadlines, clear errors, weighted sums.

Each term is called once per batch (``async def`` functions are awaited), with a deadline of ``timeout_s``. When the
batched call raises, hangs or returns bad values, the term is re-run sample by sample (concurrently, under one
deadline) to find the samples at fault. Then, by ``on_error``:

- ``"raise"`` (default): :class:`RewardError` naming the term, the first offending sample (prompt, completion,
  fields) and what went wrong — before any update uses the batch;
- ``"default"``: those samples get ``default`` and are counted (``Scorer.failures``, logged as a metric); the run
  goes on.

The total reward of a sample is ``Σ_k weight_k · r_k``.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .timeouts import CallTimeout, call_with_timeout, run_call

log = logging.getLogger("rollouts")

ON_ERROR = ("raise", "default")


class RewardError(RuntimeError):
    """A reward function failed on a sample; the message names the function and the sample."""


@dataclass
class RewardTerm:
    name: str
    fn: Callable[..., Any]
    weight: float = 1.0


@dataclass
class Scores:
    total: list[float]  # Σ weight · reward per sample
    terms: dict[str, list[float]]  # each term's reward per sample
    defaulted: dict[str, list[int]] = field(default_factory=dict)  # samples that got the default, per term


def _short(x: Any, n: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 1] + "…"


def _accepted_columns(fn: Callable) -> set[str] | None:
    """Column names ``fn`` accepts as keywords, or None when it takes ``**fields`` (or cannot be inspected)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


class Scorer:
    def __init__(self, terms: list[RewardTerm], *, timeout_s: float | None = 300.0, on_error: str = "raise",
                 default: float = 0.0):
        if not terms:
            raise ValueError("no reward functions: give at least one (e.g. rewards: [{name: exact_match}])")
        if on_error not in ON_ERROR:
            raise ValueError(f"reward on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        names = [t.name for t in terms]
        self.terms = [RewardTerm(n if names.count(n) == 1 else f"{n}#{names[:i].count(n) + 1}", t.fn, t.weight)
                      for i, (n, t) in enumerate(zip(names, terms))]
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.default = float(default)
        self.failures = {t.name: 0 for t in self.terms}  # samples that got the default, since the start
        self._columns = {t.name: _accepted_columns(t.fn) for t in self.terms}

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __call__(self, prompts: list[str], completions: list[str], fields: list[dict]) -> Scores:
        n = len(completions)
        if len(prompts) != n or len(fields) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(fields)} field rows differ")
        keys = sorted({k for f in fields for k in f if k not in ("prompts", "completions")})
        columns = {k: [f.get(k) for f in fields] for k in keys}
        terms, defaulted = {}, {}
        for term in self.terms:
            accepted = self._columns[term.name]
            cols = columns if accepted is None else {k: v for k, v in columns.items() if k in accepted}
            terms[term.name], bad = self._run(term, prompts, completions, cols)
            if bad:
                defaulted[term.name] = bad
        total = [sum(t.weight * terms[t.name][i] for t in self.terms) for i in range(n)]
        return Scores(total=total, terms=terms, defaulted=defaulted)

    # ---------------------------------------------------------------------------------------------- internals
    def _run(self, term: RewardTerm, prompts, completions, cols) -> tuple[list[float], list[int]]:
        n = len(completions)
        try:
            values = call_with_timeout(term.fn, (prompts, completions), cols, timeout=self.timeout_s)
            problem = _check_values(values, n)
            if problem is None:
                return [float(v) for v in values], []
            batch_error = f"returned {problem}"
        except CallTimeout as e:
            batch_error = str(e)
        except Exception as e:  # diagnosed sample by sample below
            batch_error = f"raised {type(e).__name__}: {e}"
        values, errors = self._per_sample(term, prompts, completions, cols)
        if not errors:
            log.warning("reward %r %s on the batch but works sample by sample; using per-sample values",
                        term.name, batch_error)
            return values, []
        first = min(errors)
        what = (f"reward {term.name!r} {errors[first]} on sample {first} ({len(errors)} of {n} samples failed): "
                f"prompt={_short(prompts[first])}, completion={_short(completions[first])}, "
                f"fields={ {k: _short(v[first], 80) for k, v in cols.items()} }")
        if self.on_error == "raise":
            raise RewardError(what + ". Fix the function, or set rollout.reward_on_error: default to score such "
                              "samples with rollout.reward_default and count them")
        self.failures[term.name] += len(errors)
        log.warning("%s; scored %g (%d such samples so far)", what, self.default, self.failures[term.name])
        for i in errors:
            values[i] = self.default
        return values, sorted(errors)

    def _per_sample(self, term: RewardTerm, prompts, completions, cols) -> tuple[list[float], dict[int, str]]:
        """Each sample alone, concurrently, under one shared deadline: (values, {sample: what went wrong})."""
        n = len(completions)
        boxes: list[dict] = [{} for _ in range(n)]

        def one(i: int):
            try:
                boxes[i]["value"] = run_call(term.fn, ([prompts[i]], [completions[i]]),
                                             {k: [v[i]] for k, v in cols.items()})
            except BaseException as e:
                boxes[i]["error"] = e

        if self.timeout_s is None:
            for i in range(n):
                one(i)
        else:
            threads = [threading.Thread(target=one, args=(i,), daemon=True, name=f"reward:{term.name}:{i}")
                       for i in range(n)]
            deadline = time.monotonic() + self.timeout_s
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
        values, errors = [self.default] * n, {}
        for i, box in enumerate(boxes):
            if "error" in box:
                e = box["error"]
                errors[i] = f"raised {type(e).__name__}: {e}"
            elif "value" not in box:
                errors[i] = f"did not return within {self.timeout_s:g} s"
            else:
                problem = _check_values(box["value"], 1)
                if problem is None:
                    values[i] = float(box["value"][0])
                else:
                    errors[i] = f"returned {problem}"
        return values, errors


def _check_values(values: Any, n: int) -> str | None:
    """None when ``values`` is ``n`` finite numbers, else what is wrong with it."""
    try:
        length = len(values)
    except TypeError:
        return f"a {type(values).__name__}, not a list of {n} numbers"
    if length != n:
        return f"{length} values for {n} completions"
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            return f"{v!r} (not a number) at position {i}"
        if not math.isfinite(x):
            return f"{x} (not finite) at position {i}"
    return None
