"""`align eval` / `align generate` on a finished run."""

import json
import os

import pytest
import yaml
from helpers import tiny_config, write_jsonl

from align.cli import main


def _trained_run(tmp_path, **sections):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{2 * i}?"}], "answer": str(3 * i)} for i in range(8)]
    evalp = write_jsonl(tmp_path / "test.jsonl", rows)
    sections = {"train": {"steps": 6, "lr": 3e-3}, **sections}
    cfg = tiny_config(tmp_path, eval={"prompts": evalp, "max_new_tokens": 4, "n": 3, "temperature": 1.0}, **sections)
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


def test_eval_of_a_lora_run_reproduces_its_report_with_kl_to_the_disabled_adapters(tmp_path, capsys):
    """A LoRA run's final/ is an adapter: `align eval` evaluates the adapted model (the run's own numbers, sampled at
    temperature 1) and its KL reference is the same model with the adapters disabled — equal to the KL against the
    base model loaded separately (`--ref`)."""
    cfg, evalp = _trained_run(tmp_path, peft={"r": 4, "alpha": 16}, train={"steps": 6, "lr": 3e-2})
    run = cfg["run_dir"]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert "kl_to_ref" in out and "reward" in out
    result = json.load(open(os.path.join(run, "eval.json")))
    for k in ("accuracy", "pass@1", "pass@3", "mean_length", "reward"):
        assert result["metrics"][k] == summary["after"][k], k
    assert result["reference"].endswith("(adapters disabled)") and result["engine"] == "hf"
    kl = result["metrics"]["kl_to_ref"]
    assert kl > 1e-4  # the adapter moved the model
    other = tmp_path / "ref.json"
    assert main(["eval", run, "--ref", os.path.join(run, "init-model"), "--out", str(other)]) == 0
    assert json.load(open(other))["metrics"]["kl_to_ref"] == pytest.approx(kl, rel=1e-5)
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", os.path.join(run, "final"), "--prompts", evalp, "--out", str(gen)]) == 0
    assert len(open(gen).readlines()) == 8
