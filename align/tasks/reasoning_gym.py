"""reasoning-gym tasks as prompt(+answer) datasets, scored by the task's own verifier.

reasoning-gym (Apache-2.0, offline, ``pip install reasoning-gym``) generates ~100 procedural task types
(arithmetic, algebra, logic, puzzles) with exact answers: ``reasoning_gym.create_dataset(task, size=N, seed=s)``.
:func:`task_rows` turns one into rows of our ``prompt`` format::

    {"prompt": [{"role": "system", ...}, {"role": "user", "content": QUESTION}],
     "answer": "...", "task": "chain_sum", "question": QUESTION, "metadata": "{...json...}"}

The extra columns are what the ``reasoning_gym`` reward (``rollouts/reasoning_gym_reward.py``) needs to call the
task's ``score_answer``; every written row is checked to score 1.0 with its own answer after the JSON round trip.

    align data reasoning-gym chain_sum --size 100 --seed 2 --out data/chain_sum/test.jsonl
    align data reasoning-gym chain_sum --size 2000 --seed 1 --exclude data/chain_sum/test.jsonl \
        --out data/chain_sum/train.jsonl

``--exclude`` drops questions that appear in other files (a held-out set stays held out); repeated questions
within one file are dropped too.
"""

from __future__ import annotations

import json

from . import write_jsonl

# The system prompt asks for the answer in <answer></answer> tags, which is how the reward reads it; "none" keeps
# the chat template's own default system prompt. The others are reasoning-gym's (reasoning_gym.utils.SYSTEM_PROMPTS).
FORMAT_PROMPT = ("Answer the question. Put only the final answer between <answer> and </answer> tags, "
                 "for example <answer>42</answer>.")


def system_prompt(name: str | None) -> str | None:
    """``format`` (ours), ``none``, a reasoning-gym prompt name (``default``, ``simple``, ``direct``, …) or text."""
    if name in (None, "none", ""):
        return None
    if name == "format":
        return FORMAT_PROMPT
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS.get(name, name)


def task_rows(task: str, size: int, seed: int, config: dict | None = None, system: str | None = "format",
              exclude: set[str] | frozenset[str] = frozenset(), unique: bool = True) -> list[dict]:
    """``size`` prompt rows of reasoning-gym ``task`` (its generator options in ``config``), deterministic in
    ``seed``. Questions in ``exclude`` (and, with ``unique``, repeats) are skipped; more items are drawn until
    ``size`` rows remain."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning-gym is not installed: pip install reasoning-gym") from None
    if task not in reasoning_gym.factory.DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(reasoning_gym.factory.DATASETS), n=3)
        raise ValueError(f"unknown reasoning-gym task {task!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                    else ""))
    sys_text = system_prompt(system)
    rows: list[dict] = []
    seen = set(exclude)
    drawn = 0
    for attempt in range(6):  # exclusions / repeats left too few: draw again from a pool twice as large
        pool = max(size, 1) * 2 ** (attempt + 1)
        ds = reasoning_gym.create_dataset(task, size=pool, seed=seed, **(config or {}))
        for idx in range(drawn, pool):
            entry = ds[idx]
            q = entry["question"]
            if q in seen:
                continue
            if unique:
                seen.add(q)
            rows.append(_row(task, entry, sys_text, ds))
            if len(rows) == size:
                return rows
        drawn = pool
    raise ValueError(f"reasoning-gym task {task!r} gave only {len(rows)} new questions out of {drawn} drawn; "
                     "ask for fewer rows, another seed, or a harder config")


def _row(task: str, entry: dict, sys_text: str | None, ds) -> dict:
    metadata = json.dumps(entry.get("metadata") or {}, default=str)
    row_entry = {"question": entry["question"], "answer": str(entry["answer"]), "metadata": json.loads(metadata)}
    if ds.score_answer(row_entry["answer"], row_entry) < 1.0:
        raise ValueError(f"reasoning-gym task {task!r}: its own answer {entry['answer']!r} does not score 1.0 after "
                         "the JSON round trip of its metadata; this task cannot be used from a file")
    messages = ([{"role": "system", "content": sys_text}] if sys_text else []) + \
        [{"role": "user", "content": entry["question"]}]
    return {"prompt": messages, "answer": row_entry["answer"], "task": task, "question": entry["question"],
            "metadata": metadata}


def questions_in(paths: list[str]) -> set[str]:
    """The ``question`` column of JSONL files written here (for ``--exclude``)."""
    out = set()
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.add(json.loads(line)["question"])
    return out


def parse_config(items: list[str]) -> dict:
    """``["max_terms=3", "allow_negation=false"]`` → ``{"max_terms": 3, "allow_negation": False}`` (YAML scalars)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def add_parser(data_sub) -> None:
    p = data_sub.add_parser("reasoning-gym", help="write a reasoning-gym task as prompt(+answer) JSONL rows",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("task", help="reasoning-gym task name, e.g. chain_sum, basic_arithmetic, gsm_symbolic")
    p.add_argument("--size", type=int, required=True, help="number of rows")
    p.add_argument("--seed", type=int, default=0, help="generator seed (use different seeds for train and test)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="the task's generator options, e.g. max_terms=3 max_digits=2")
    p.add_argument("--system", default="format", help="system prompt: 'format' (answer in <answer> tags; default), "
                   "'none' (the chat template's default), a reasoning-gym prompt name, or the text itself")
    p.add_argument("--exclude", nargs="*", default=[], metavar="FILE", help="drop questions found in these files")
    p.set_defaults(fn=_cmd)


def _cmd(args) -> int:
    import sys

    try:
        rows = task_rows(args.task, args.size, args.seed, parse_config(args.config), args.system,
                         exclude=frozenset(questions_in(args.exclude)))
    except (ImportError, ValueError, TypeError, AssertionError, OSError) as e:
        # TypeError / AssertionError: reasoning-gym's own check of the --config options
        print(f"error: {type(e).__name__ + ': ' if isinstance(e, (TypeError, AssertionError)) else ''}{e}",
              file=sys.stderr)
        return 2
    print(write_jsonl(rows, args.out))
    return 0
