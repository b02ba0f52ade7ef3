"""Multi-stage pipelines (align/pipeline.py): sft → dpo on CPU.

- stage 2 starts from stage 1's final weights (compared tensor by tensor) and uses them as its DPO reference;
- each stage has its own data, loss options and sub-directory;
- resume: a stop or a crash in the middle of stage 2, then the same command again, skips stage 1 and continues stage 2
  from its checkpoint, ending with the weights of an uninterrupted run;
- a stage that already ran with other training settings is an error, not a silent mix.
"""

import json
import os
import signal

import pytest
import torch
from helpers import arith_rows, write_jsonl
from test_reference import pair_rows

from align import pipeline
from align.config import load_config, pipeline_from_dict
from align.configio import ConfigError
from align.trainer import Trainer


def two_stage(tmp_path, **dpo_train):
    os.makedirs(tmp_path, exist_ok=True)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", arith_rows(48))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    return {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "num_heads": 1, "num_layers": 1,
                                           "intermediate_size": 128}},
        "data": {"max_length": 48},
        "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 3e-3},
        "log": {"progress": False, "tensorboard": False, "plots": False},
        "stages": [
            {"name": "sft", "loss": "sft", "data": {"train": sft_data}, "train": {"steps": 5}},
            {"name": "dpo", "loss": {"name": "dpo", "beta": 0.5}, "data": {"train": pairs},
             "train": {"steps": 6, "lr": 1e-3, "save_every": 2, **dpo_train}},
        ],
    }


def load_weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture()
def spy_setup(monkeypatch):
    """Record, for each Trainer set up, its run_dir, its step after setup and its weights before any update."""
    seen = []
    real = Trainer.setup

    def setup(self):
        first = not self._set_up
        out = real(self)
        if first:
            seen.append({"run_dir": self.run_dir, "step": self.step, "resume_from": self.resume_from,
                         "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()}})
        return out

    monkeypatch.setattr(Trainer, "setup", setup)
    return seen


def test_second_stage_starts_from_the_first_stages_weights(tmp_path, spy_setup):
    cfg = two_stage(tmp_path)
    results = pipeline.run(pipeline_from_dict(cfg))
    run = cfg["run_dir"]
    assert [s["run_dir"] for s in spy_setup] == [os.path.join(run, "sft"), os.path.join(run, "dpo")]
    init = load_weights(os.path.join(run, "sft", "init-model"))
    sft_final = load_weights(os.path.join(run, "sft", "final"))
    dpo_start = spy_setup[1]["weights"]
    dpo_final = load_weights(os.path.join(run, "dpo", "final"))
    for k in sft_final:
        assert torch.equal(dpo_start[k], sft_final[k]), k  # stage 2 begins exactly where stage 1 ended
    assert any(not torch.equal(sft_final[k], init[k]) for k in init)  # stage 1 trained
    assert any(not torch.equal(dpo_final[k], sft_final[k]) for k in sft_final)  # stage 2 trained
    # stage 2's reference is stage 1's final model: on the first DPO step policy = reference, so h = 0, loss = log 2
    rows = [json.loads(l) for l in open(os.path.join(run, "dpo", "metrics.jsonl"))]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    # own sub-directories, own resolved configs, one summary
    for name, loss in (("sft", "sft"), ("dpo", "dpo")):
        assert os.path.isfile(os.path.join(run, name, "final", "model.safetensors"))
        assert json.load(open(os.path.join(run, name, "summary.json")))["steps"] == {"sft": 5, "dpo": 6}[name]
        import yaml

        assert yaml.safe_load(open(os.path.join(run, name, "config.yaml")))["loss"]["name"] == loss
    assert set(json.load(open(os.path.join(run, "summary.json")))) == {"sft", "dpo"}
    assert results["dpo"]["final_model"].endswith(os.path.join("dpo", "final"))


def _final(run_dir):
    return load_weights(os.path.join(run_dir, "dpo", "final"))


def _uninterrupted_final(tmp_path):
    straight = two_stage(tmp_path / "straight")
    pipeline.run(pipeline_from_dict(straight))
    return _final(straight["run_dir"])


def test_stop_in_stage_two_then_resume(tmp_path, spy_setup, monkeypatch):
    expected = _uninterrupted_final(tmp_path)
    cfg = two_stage(tmp_path / "b")
    real_step = Trainer._optimizer_step

    def step_then_sigterm(self, *a, **k):
        out = real_step(self, *a, **k)
        if self.run_dir.endswith("dpo") and self.step == 2:  # Ctrl-C / SIGTERM in the middle of stage 2
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_sigterm)
    results = pipeline.run(pipeline_from_dict(cfg))
    assert "final_model" not in results["dpo"]
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    spy_setup.clear()
    pipeline.run(pipeline_from_dict(cfg))  # the same command again
    assert [s["run_dir"] for s in spy_setup] == [os.path.join(cfg["run_dir"], "dpo")]  # stage 1 skipped
    assert spy_setup[0]["step"] == 3 and spy_setup[0]["resume_from"].endswith("step-00000003")
    got = _final(cfg["run_dir"])
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_crash_in_stage_two_then_resume(tmp_path, spy_setup, monkeypatch):
    """A crash (no graceful save) after step 3 of stage 2: the rerun continues from the step-2 checkpoint."""
    expected = _uninterrupted_final(tmp_path)
    cfg = two_stage(tmp_path / "b")
    real_step = Trainer._optimizer_step

    def crash(self, *a, **k):
        if self.run_dir.endswith("dpo") and self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(pipeline_from_dict(cfg))
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    spy_setup.clear()
    results = pipeline.run(pipeline_from_dict(cfg))
    assert [s["run_dir"] for s in spy_setup] == [os.path.join(cfg["run_dir"], "dpo")]
    assert spy_setup[0]["step"] == 2
    assert results["dpo"]["steps"] == 6
    got = _final(cfg["run_dir"])
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_changed_settings_of_a_finished_stage_are_an_error(tmp_path):
    cfg = two_stage(tmp_path)
    cfg["stages"][1]["train"]["steps"] = 1
    pipeline.run(pipeline_from_dict(cfg))
    cfg["stages"][0]["train"]["lr"] = 1e-2
    with pytest.raises(ConfigError, match=r"stage 'sft' in .* already ran with other settings \(train.lr: 0.003 → 0.01\)"):
        pipeline.run(pipeline_from_dict(cfg))
    cfg["stages"][0]["train"]["lr"] = 3e-3
    cfg["log"] = {**cfg["log"], "progress": False}
    cfg["eval"] = {"max_new_tokens": 4}  # evaluation settings may change
    pipeline.run(pipeline_from_dict(cfg))


def test_stage_loss_replaces_the_top_level_loss(tmp_path):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({
        "data": {"train": "examples/data/arith/train.jsonl"},
        "loss": {"name": "sft", "aggregation": "seq_mean_token_mean"},
        "stages": [{"name": "sft"}, {"name": "dpo", "loss": {"name": "dpo", "beta": 0.2},
                                      "data": {"train": "examples/data/arith/pairs.jsonl"}}],
    }))
    pipe = load_config(str(path))
    assert pipe.stages[0].config.loss.options == {"aggregation": "seq_mean_token_mean"}
    assert pipe.stages[1].config.loss.name == "dpo" and pipe.stages[1].config.loss.options == {"beta": 0.2}


def test_pipeline_errors(tmp_path):
    cfg = two_stage(tmp_path)
    cfg["stages"][1]["model"] = {"name": "@stage:dpo"}  # a later stage may name a model, but only earlier stages
    with pytest.raises(ConfigError, match=r"stages\[1\].model.name: '@stage:dpo' names no earlier stage"):
        pipeline_from_dict(cfg)
    cfg = two_stage(tmp_path)
    cfg["stages"][1]["loss"] = {"name": "dpo", "variant": "ipo"}
    with pytest.raises(ConfigError, match=r"stages\[1\].loss \(dpo\): variant 'ipo' is ambiguous"):
        pipeline_from_dict(cfg)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_sft_then_dpo_runs(tmp_path, monkeypatch):
    """examples/sft_then_dpo.yaml as shipped, shrunk by overrides: both stages report accuracy and preference metrics."""
    monkeypatch.chdir(REPO)
    small = ["model.tiny.hidden_size=64", "model.tiny.num_heads=1", "model.tiny.num_layers=1",
             "model.tiny.intermediate_size=128", "data.limit=32", "eval.limit=6", "eval.pairs_limit=6",
             "stages.0.train.steps=2", "stages.1.train.steps=2", "log.progress=false", "log.plots=false",
             "log.tensorboard=false", f"run_dir={tmp_path / 'run'}"]
    pipe = load_config("examples/sft_then_dpo.yaml", small)
    assert [(s.name, s.config.loss.name) for s in pipe.stages] == [("sft", "sft"), ("dpo", "dpo")]
    results = pipeline.run(pipe)
    for name in ("sft", "dpo"):
        for when in ("before", "after"):
            assert {"accuracy", "pref_accuracy", "pref_logp_accuracy", "pref_margin"} <= set(results[name][when])
    assert results["dpo"]["before"]["pref_accuracy"] == 0.0  # stage 2 starts as its own reference
    table = pipeline.report(results)
    assert "[dpo] pref_accuracy" in table and "[sft] accuracy" in table


def test_example_sft_then_dpo_lora_runs(tmp_path, monkeypatch):
    """examples/sft_then_dpo_lora.yaml, shrunk: the DPO stage trains LoRA adapters on sft/final (its reference)."""
    from align import lora

    monkeypatch.chdir(REPO)
    small = ["model.tiny.hidden_size=64", "model.tiny.num_heads=1", "model.tiny.num_layers=1",
             "model.tiny.intermediate_size=128", "data.limit=32", "eval.limit=6", "eval.pairs_limit=6",
             "stages.0.train.steps=2", "stages.1.train.steps=2", "log.progress=false", "log.plots=false",
             "log.tensorboard=false", f"run_dir={tmp_path / 'run'}"]
    pipe = load_config("examples/sft_then_dpo_lora.yaml", small)
    assert [s.config.peft is not None for s in pipe.stages] == [False, True]
    results = pipeline.run(pipe)
    assert results["dpo"]["before"]["pref_accuracy"] == 0.0  # the disabled adapters are the reference
    assert lora.is_adapter_dir(results["dpo"]["final_model"]) and not lora.is_adapter_dir(results["sft"]["final_model"])


def test_held_out_pairs_match_the_test_questions():
    """align.tasks.arithmetic's test_pairs.jsonl: the held-out questions, chosen = the answer, rejected ≠ it."""
    rows = [json.loads(l) for l in open(os.path.join(REPO, "examples", "data", "arith", "test_pairs.jsonl"))]
    test = [json.loads(l) for l in open(os.path.join(REPO, "examples", "data", "arith", "test.jsonl"))]
    train = {json.dumps(json.loads(l)["prompt"]) for l in open(os.path.join(REPO, "examples", "data", "arith",
                                                                           "pairs.jsonl"))}
    assert len(rows) == len(test) == 200
    for pair, t in zip(rows, test):
        assert pair["prompt"] == t["prompt"] and pair["chosen"][0]["content"] == t["answer"]
        assert pair["rejected"][0]["content"] != t["answer"]
        assert json.dumps(pair["prompt"]) not in train
