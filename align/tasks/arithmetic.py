"""Two-number addition with an exact answer: the quickstart's task.

``python -m align.tasks.arithmetic --out examples/data/arith`` writes (deterministically, from a seed):

- ``train.jsonl``    chat prompt/completion rows: "What is 37+48?" → "85"
- ``test.jsonl``     held-out chat prompts with an ``answer`` column (pairs of numbers never seen in training)
- ``prompts.jsonl``  training prompts with ``answer`` (for RL / best-of-N from rollouts)
- ``pairs.jsonl``    preference rows: the correct answer chosen, a plausible wrong one (a dropped carry, an
                     off-by-one digit) rejected
- ``test_pairs.jsonl`` the same kind of pairs on the held-out test questions (for ``eval.pairs``)

Exact-match scoring (rollouts/rewards.py ``exact_match``) is the verifier.
"""

from __future__ import annotations

import argparse
import json
import os
import random


def question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def plausible_wrong(a: int, b: int, rng: random.Random) -> str:
    """A wrong answer a model could make: the carry dropped, or one digit off by one."""
    right = a + b
    candidates = set()
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}")))
    candidates.add(no_carry)
    digits = str(right)
    for i in range(len(digits)):
        for d in (-1, 1):
            v = int(digits[i]) + d
            if 0 <= v <= 9 and not (i == 0 and v == 0 and len(digits) > 1):
                candidates.add(int(digits[:i] + str(v) + digits[i + 1:]))
    candidates.discard(right)
    return str(rng.choice(sorted(candidates)))


def make(out: str, max_value: int = 99, test_size: int = 200, seed: int = 0, train_size: int | None = None) -> dict:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_value + 1) for b in range(max_value + 1)]
    rng.shuffle(pairs)
    test, train = pairs[:test_size], pairs[test_size:]
    if train_size is not None:
        train = train[:train_size]
    os.makedirs(out, exist_ok=True)

    def chat(a, b):
        return [{"role": "user", "content": question(a, b)}]

    def write(name, rows):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    write("train.jsonl", [{"prompt": chat(a, b), "completion": [{"role": "assistant", "content": str(a + b)}]}
                          for a, b in train])
    write("test.jsonl", [{"prompt": chat(a, b), "answer": str(a + b)} for a, b in test])
    write("prompts.jsonl", [{"prompt": chat(a, b), "answer": str(a + b)} for a, b in train])
    write("pairs.jsonl", [{"prompt": chat(a, b), "chosen": [{"role": "assistant", "content": str(a + b)}],
                           "rejected": [{"role": "assistant", "content": plausible_wrong(a, b, rng)}]}
                          for a, b in train])
    test_rng = random.Random(f"{seed}-test-pairs")  # its own stream: the files above stay as they were
    write("test_pairs.jsonl", [{"prompt": chat(a, b), "chosen": [{"role": "assistant", "content": str(a + b)}],
                                "rejected": [{"role": "assistant", "content": plausible_wrong(a, b, test_rng)}]}
                               for a, b in test])
    return {"train": len(train), "test": len(test)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="examples/data/arith")
    p.add_argument("--max-value", type=int, default=99)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make(a.out, a.max_value, a.test_size, a.seed, a.train_size))


if __name__ == "__main__":
    main()
