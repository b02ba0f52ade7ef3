"""GSM8K (Cobbe et al. 2021) as prompt(+answer) files for RL: ``examples/gsm8k_grpo_vllm.yaml``'s data.

``python -m align.tasks.gsm8k --out data/gsm8k`` reads the hub dataset ``openai/gsm8k`` (config ``main``; needs the
network) and writes ``train.jsonl`` (7,473 rows) and ``test.jsonl`` (1,319 rows), one chat prompt per row::

    {"prompt": [{"role": "user", "content": "<question> Let's think step by step and output the final answer after
     \\"####\\"."}], "answer": "72"}

``answer`` is the number after GSM8K's ``####`` marker (thousands separators removed), what the ``numeric_match``
reward compares with the last number of a completion. The instruction is verl's GSM8K preprocessing
(``examples/data_preprocess/gsm8k.py``), so rewards are comparable with its recipes.
"""

from __future__ import annotations

import argparse
import json
import os

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def final_answer(solution: str) -> str:
    """The number after GSM8K's ``####`` marker: ``"... #### 1,200"`` → ``"1200"``."""
    if "####" not in solution:
        raise ValueError(f"a GSM8K solution ends with '#### <answer>'; got {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def to_row(question: str, solution: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"{question.strip()} {INSTRUCTION}"}],
            "answer": final_answer(solution)}


def make(out: str, name: str = "openai/gsm8k", config: str = "main") -> dict[str, int]:
    import datasets

    os.makedirs(out, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        rows = datasets.load_dataset(name, config, split=split)
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(to_row(r["question"], r["answer"])) + "\n")
        counts[split] = len(rows)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gsm8k")
    p.add_argument("--dataset", default="openai/gsm8k", help="hub dataset name")
    p.add_argument("--config", default="main", help="dataset config (main or socratic)")
    a = p.parse_args(argv)
    print(make(a.out, a.dataset, a.config))


if __name__ == "__main__":
    main()
