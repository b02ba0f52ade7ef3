"""examples/compare_sft.py end to end on a very small config: every loss trains, the table and figure are written."""

import importlib.util
import json
import os

import yaml
from helpers import arith_rows, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("compare_sft", os.path.join(REPO, "examples", "compare_sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_script_writes_table_and_png(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(32))
    held_out = write_jsonl(tmp_path / "test.jsonl", [{"prompt": [{"role": "user", "content": f"What is {i}+2?"}],
                                                      "answer": str(i + 2)} for i in range(5)])
    config = {
        "seed": 0,
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 128}},
        "data": {"train": train, "max_length": 48},
        "train": {"batch_size": 4, "micro_batch_size": 4, "lr": 1e-3},
        "eval": {"prompts": held_out, "max_new_tokens": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["--config", str(path), "--base-steps", "2", "--steps", "3", "--losses", "sft,asft,psft", "--out", str(out),
            "--set", "loss.kl_weight=0.2"]
    assert _script().main(argv) == 0
    assert (out / "base" / "final" / "model.safetensors").is_file()  # the shared initial model
    table = (out / "compare.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
        ["initial model", "sft", "asft", "psft"]
    assert (out / "compare.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    assert results["initial"]["drift_kl"] == 0.0 and results["initial"]["accuracy"] is not None
    assert all(r["drift_kl"] > 0 and len(r["train_nll"]) == 3 for r in results["runs"])
    # the override reached the loss that has the option, and only that one
    options = {r["loss"]: r["options"] for r in results["runs"]}
    assert options["asft"]["kl_weight"] == 0.2 and "kl_weight" not in options["sft"]
    assert options["psft"]["minibatches"] == 8 and "| asft | kl_weight 0.2 |" in table
