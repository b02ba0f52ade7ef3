"""examples/bon_frontier.py end to end on a very small config: every method trains from the shared reference, each
spends the sampling budget it was given (read back from the run: samples file + reference counter), the table and
figure are written, and --replot rebuilds the same table from results.json."""

import json
import os

import yaml
from helpers import arith_rows, load_example, write_jsonl


def test_frontier_script_spends_equal_budgets_and_writes_table_and_png(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(32))
    question = [{"role": "user", "content": "What is {}+2?"}]
    rows = [{"prompt": [{**question[0], "content": question[0]["content"].format(i)}], "answer": str(i + 2)}
            for i in range(8)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    held_out = write_jsonl(tmp_path / "test.jsonl", rows[:3])
    config = {
        "seed": 0,
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 128}},
        "data": {"train": train, "max_length": 48},
        "eval": {"prompts": held_out, "max_new_tokens": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    methods = ["bon_sft", "bond", "vbon", "grpo", "jbond"]
    argv = ["--config", str(path), "--prompts", prompts, "--out", str(out), "--base-steps", "2", "--n", "4",
            "--budget", "64", "--prompts-per-step", "4", "--prompt-limit", "8", "--reference-samples", "2",
            "--points", "2", "--eval-samples", "2", "--ref-samples", "4", "--methods", ",".join(methods)]
    script = load_example("bon_frontier")
    assert script.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert list(runs) == methods
    # 4 prompts × 4 samples per step; bond / vbon first spend k = 2 per distinct prompt (8 prompts) on π_ref
    assert {m: (r["steps"], r["budget"]["policy"], r["budget"]["reference"]) for m, r in runs.items()} == {
        "bon_sft": (4, 64, 0), "bond": (3, 48, 16), "vbon": (3, 48, 16), "grpo": (4, 64, 0),
        "jbond": (5, 20, 40)}  # one policy + two anchor samples per prompt per step
    for r in runs.values():
        assert r["points"][0] == {"step": 0, "reward": results["reference"]["reward"], "kl": 0.0}
        assert len(r["points"]) == 3 and r["points"][-1]["step"] == r["steps"] and r["points"][-1]["kl"] >= 0
    assert 0 <= results["reference"]["reward"] <= results["reference"]["bon_reward"] <= 1
    table = (out / "frontier.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
        ["π_ref", "Best-of-4 of π_ref", *methods]
    assert (out / "frontier.png").stat().st_size > 10_000
    os.remove(out / "frontier.md")
    assert script.main(["--out", str(out), "--replot"]) == 0
    assert (out / "frontier.md").read_text() == table
