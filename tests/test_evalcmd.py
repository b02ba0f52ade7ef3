"""`align eval` / `align generate` on a finished run."""

import json
import os

import yaml
from helpers import tiny_config, write_jsonl

from align.cli import main


def _trained_run(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{2 * i}?"}], "answer": str(3 * i)} for i in range(8)]
    evalp = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = tiny_config(tmp_path, eval={"prompts": evalp, "max_new_tokens": 4, "n": 3, "temperature": 1.0},
                      train={"steps": 6, "lr": 3e-3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return cfg, evalp


def test_eval_reproduces_the_runs_own_report_and_generate_writes_jsonl(tmp_path, capsys):
    cfg, evalp = _trained_run(tmp_path)
    run = cfg["run_dir"]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert "pass@3" in out and "kl_to_ref" in out
    result = json.load(open(os.path.join(run, "eval.json")))
    for k in ("accuracy", "pass@1", "pass@3", "mean_length"):
        assert result["metrics"][k] == summary["after"][k], k
    assert result["metrics"]["kl_to_ref"] > 0  # trained weights differ from init-model
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", run, "--prompts", evalp, "--out", str(gen), "eval.n=2"]) == 0
    lines = [json.loads(l) for l in open(gen)]
    assert len(lines) == 16 and {"prompt", "completion", "finish_reason"} <= set(lines[0])


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
