"""CHAMP competition-math problems as preference pairs: the reference solution over a flawed model solution.

CHAMP (Mao et al. 2024, "CHAMP: A Competition-level Dataset for Fine-Grained Analyses of LLMs' Mathematical
Reasoning Capabilities"; MIT, ``pip install champ-dataset``) has 270 problems (number theory, inequalities,
polynomials, sequences, combinatorics), each with a step-by-step reference solution, and 540 solutions written by
GPT-3.5, GPT-4, GPT-4 Turbo and PaLM 2 in which annotators marked the first wrong step. The 444 solutions with a
marked wrong step become pairs::

    {"prompt": [{"role": "user", "content": "Solve the following problem. ...\\n\\n<problem>"}],
     "chosen": [{"role": "assistant", "content": <reference solution, one step per line>}],
     "rejected": [{"role": "assistant", "content": <the model's solution>}],
     "id": "P_Combinatorics_1", "category": ..., "author": "GPT-3.5", "first_wrong_step": ..., "answer": ...}

The user message is CHAMP's own main prompt (``champ_dataset.prompt``: "Solve the following problem. Make sure to
show your work before giving the final answer."). Half of the annotated solutions were written with concepts and
hints in the prompt ("Direct C w/ H"); the pair keeps the plain problem prompt for both. Solutions judged
mistake-free (96) are left out. Nothing is copied into this repository; the rows are built from the installed
package:

    align data champ --out data/champ/pairs.jsonl                       # all 444 pairs
    align data champ --split train --out data/champ/train_pairs.jsonl   # problems 1-4 of every 5 (CHAMP order)
    align data champ --split test --out data/champ/test_pairs.jsonl     # every 5th problem: held out

The split is by problem, so no held-out problem's reference solution is ever trained on.
"""

from __future__ import annotations

# CHAMP's prompt_main (champ_dataset/prompt.py), with the problem in place of {problem.text}.
INSTRUCTION = "Solve the following problem. Make sure to show your work before giving the final answer."


def reference_solution(problem) -> str:
    """The reference solution, one step per line."""
    return "\n".join(step.text.strip() for step in problem.solution.steps)


SPLITS = ("all", "train", "test")


def champ_pairs(version: str = "v0", split: str = "all", test_every: int = 5) -> list[dict]:
    """Preference rows (reference solution chosen, flawed model solution rejected), in CHAMP's problem order;
    ``split="test"`` keeps the pairs of every ``test_every``-th problem, ``"train"`` the others."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        import champ_dataset
    except ImportError:
        raise ImportError("champ-dataset is not installed: pip install champ-dataset") from None
    ds = champ_dataset.load(version)
    rows = []
    for i, (pid, problem) in enumerate(ds.problems.items()):
        if split != "all" and (i % test_every == 0) != (split == "test"):
            continue
        prompt = [{"role": "user", "content": f"{INSTRUCTION}\n\n{problem.text}"}]
        chosen = reference_solution(problem)
        for key, ann in problem.fws_annotations.items():
            if ann.start_idx is None:  # annotated as free of mistakes: no preference against the reference
                continue
            rows.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": ann.text.strip()}],
                "id": pid, "category": problem.category, "author": ann.author, "setting": key.split("|", 1)[1],
                "first_wrong_step": ann.wrong_step(), "answer": problem.answer,
            })
    return rows


def add_parser(data_sub) -> None:
    p = data_sub.add_parser("champ", help="write CHAMP's reference-vs-flawed solution pairs as preference JSONL")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="all pairs, or by problem: test = every 5th problem (held out), train = the others")
    p.set_defaults(fn=_cmd)


def _cmd(args) -> int:
    import sys

    from . import write_jsonl

    try:
        rows = champ_pairs(split=args.split)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_jsonl(rows, args.out))
    print(f"{len(rows)} pairs")
    return 0
