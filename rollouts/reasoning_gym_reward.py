"""``reasoning_gym`` reward: a reasoning-gym task's own verifier (``score_answer``) on the model's answer.

reasoning-gym (Apache-2.0, ``pip install reasoning-gym``) generates procedural tasks offline and scores an answer
string against an entry ``{question, answer, metadata}`` with ``dataset.score_answer(answer, entry)`` ∈ [0, 1]
(1 for a correct answer; some tasks give partial credit, e.g. ``len(oracle)/len(answer)`` when the answer contains
the oracle). Prompt files written by ``align data reasoning-gym`` carry the entry in the columns ``answer``,
``metadata`` (JSON text), ``question`` and ``task``; this reward rebuilds the entry from them.

Which part of the completion is the answer (option ``extract``):

- ``answer_tag`` (default): the text inside the last ``<answer>…</answer>`` tags (reasoning-gym's own
  ``extract_answer``, the format its system prompts ask for); a completion without them scores 0.
- ``last_number``: the last number in the completion (``-1,234.5`` → ``-1234.5``), for numeric tasks and models
  that answer in prose ("The answer is 42.") instead of following the tag format.
- ``full``: the whole completion, stripped.

``strict: true`` keeps only full marks (1.0) and turns partial credit into 0, so the mean is the fraction solved.

reasoning-gym is imported when the reward is built, so it stays an optional dependency.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from .rewards import RewardFn, reward

EXTRACTORS = ("answer_tag", "last_number", "full")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@lru_cache(maxsize=None)
def _scorer(task: str):
    """A reasoning-gym dataset object of ``task``, used only for its ``score_answer`` (built once per process)."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(task, size=1, seed=0)
    except ValueError as e:
        raise ValueError(f"reward reasoning_gym: unknown task {task!r} ({e}); `python -c \"import reasoning_gym; "
                         "print(sorted(reasoning_gym.factory.DATASETS))\"` lists them") from None


def answer_in(completion: str, how: str = "answer_tag") -> str | None:
    """The answer string inside ``completion``, or None when it gives none."""
    if how == "answer_tag":
        from reasoning_gym.utils import extract_answer

        return extract_answer(completion)
    if how == "last_number":
        found = _NUMBER.findall(str(completion))
        return found[-1].replace(",", "").lstrip("+") if found else None
    return str(completion).strip()


def entry_of(answer, metadata, question) -> dict:
    """The reasoning-gym entry a row's columns describe (``metadata`` is JSON text in our files)."""
    if isinstance(metadata, str):
        metadata = json.loads(metadata) if metadata.strip() else {}
    return {"question": question, "answer": answer, "metadata": metadata or {}}


@reward("reasoning_gym")
def reasoning_gym_reward(task: str | None = None, extract: str = "answer_tag", strict: bool = False) -> RewardFn:
    """reasoning-gym's own verifier (`score_answer`, in [0, 1]) of `task` (null: each row's `task` column) on the
    answer `extract` finds in the completion: `answer_tag` (inside <answer></answer>), `last_number` or `full`.
    `strict`: only full marks count (1.0), partial credit becomes 0. Rows from `align data reasoning-gym`."""
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        raise ValueError("reward reasoning_gym needs the reasoning-gym package: pip install reasoning-gym") from None
    if extract not in EXTRACTORS:
        raise ValueError(f"reward reasoning_gym: extract must be one of {EXTRACTORS}, got {extract!r}")
    if task is not None:
        _scorer(task)  # an unknown task fails now, not at the first rollout

    def fn(prompts, completions, **fields):
        n = len(completions)
        if "answer" not in fields:
            raise KeyError("reward reasoning_gym compares against the column 'answer', which the prompts do not "
                           "have; write the prompts with `align data reasoning-gym`")
        tasks = [task] * n if task is not None else fields.get("task")
        if tasks is None:
            raise KeyError("reward reasoning_gym: give the option `task` or a `task` column in the prompts")
        metadata = fields.get("metadata") or [None] * n
        questions = fields.get("question") or list(prompts)
        out = []
        for i, completion in enumerate(completions):
            given = answer_in(completion, extract)
            entry = entry_of(fields["answer"][i], metadata[i], questions[i])
            try:
                score = float(_scorer(tasks[i]).score_answer(given, entry))
            except Exception as e:
                raise ValueError(f"reward reasoning_gym: {tasks[i]}.score_answer raised {type(e).__name__}: {e} "
                                 f"on the answer {given!r} (row answer {entry['answer']!r})") from e
            out.append(float(score >= 1.0) if strict else score)
        return out

    return fn
