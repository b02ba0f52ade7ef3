"""The loop on a tiny model: loss falls, resume is exact, checkpoints survive kill -9, NaN steps are skipped."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_config, write_jsonl

from align.checkpoint import latest_checkpoint, load_checkpoint
from align.config import pipeline_from_dict
from align.trainer import Trainer, TrainingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_for(cfg_dict):
    pipe = pipeline_from_dict(cfg_dict)
    return Trainer(pipe.stages[0].config, pipe.run_dir)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_goes_down(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 40, "lr": 3e-3, "batch_size": 16, "micro_batch_size": 16})
    t = trainer_for(cfg)
    t.fit()
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    losses_ = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses_) == 40
    assert sum(losses_[-5:]) / 5 < 0.6 * sum(losses_[:5]) / 5
    assert os.path.isfile(os.path.join(cfg["run_dir"], "final", "model.safetensors"))


def test_logged_lr_is_the_rate_each_step_applied(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 6, "lr": 1e-3, "warmup_steps": 4, "schedule": "constant"})
    trainer_for(cfg).fit()
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("loss", ["sft", "dft"])
def test_resume_gives_identical_parameters(tmp_path, loss):
    """10 steps straight vs. 5 steps, stop, new process state, resume 5 more → the same weights, bit for bit."""
    common = dict(loss={"name": loss}, train={"steps": 10, "batch_size": 8, "micro_batch_size": 3, "lr": 2e-3,
                                              "warmup_steps": 2})
    a = trainer_for(tiny_config(tmp_path / "a", **common))
    a.fit()
    b_cfg = tiny_config(tmp_path / "b", **common)
    b1 = trainer_for(b_cfg)
    b1.fit(max_steps=5)
    assert b1.step == 5 and latest_checkpoint(b_cfg["run_dir"]).endswith("step-00000005")
    del b1
    torch.manual_seed(1234)  # different global RNG state: the checkpoint must restore it
    b2 = trainer_for(b_cfg)
    b2.fit()
    assert b2.step == 10
    pa, pb = params(a.model), params(b2.model)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ra = [json.loads(l) for l in open(os.path.join(tmp_path / "a" / "run", "metrics.jsonl"))]
    rb = [json.loads(l) for l in open(os.path.join(b_cfg["run_dir"], "metrics.jsonl"))]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_micro_batching_does_not_change_the_step(tmp_path):
    """Gradient accumulation normalises by the optimizer-batch token count: 1×8 and 8×1 give the same update."""
    results = []
    for mbs in (8, 1):
        cfg = tiny_config(tmp_path / str(mbs), train={"steps": 2, "batch_size": 8, "micro_batch_size": mbs, "lr": 1e-3})
        t = trainer_for(cfg)
        t.fit()
        results.append(params(t.model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=2e-6, rtol=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import align.checkpoint as ckpt
    from align.config import pipeline_from_dict
    from align.trainer import Trainer
    import json
    cfg = json.loads({cfg!r})
    real = ckpt._fsync_tree
    def dying_fsync(path):
        if "step-00000004" in path:
            # half of the checkpoint is on disk, the rename has not happened: die like kill -9
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)
    ckpt._fsync_tree = dying_fsync
    pipe = pipeline_from_dict(cfg)
    Trainer(pipe.stages[0].config, pipe.run_dir).fit()
""")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 6, "batch_size": 8, "micro_batch_size": 8, "save_every": 2})
    script = KILL_SCRIPT.format(tests=os.path.join(REPO, "tests"), cfg=json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = cfg["run_dir"]
    latest = latest_checkpoint(run_dir)
    assert latest.endswith("step-00000002")
    assert any(d.startswith(".tmp-step-00000004") for d in os.listdir(os.path.join(run_dir, "checkpoints")))
    state, _ = load_checkpoint(latest)
    assert state["step"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(latest, "model"))  # loadable
    t = trainer_for(cfg)  # resume in this process and finish
    t.fit()
    assert t.step == 6
    assert not any(d.startswith(".tmp-") for d in os.listdir(os.path.join(run_dir, "checkpoints")))


def test_graceful_stop_on_sigterm_saves(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 50})
    t = trainer_for(cfg)
    t.setup()
    original = t._optimizer_step

    def step_then_signal(*a, **k):
        out = original(*a, **k)
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    t._optimizer_step = step_then_signal
    t.fit()
    assert 3 <= t.step < 50
    assert latest_checkpoint(cfg["run_dir"]).endswith(f"step-{t.step:08d}")


class NaNAfterTwo:
    pass


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"steps": 20, "max_bad_steps": 3, "save_every": 0})
    t = trainer_for(cfg)
    t.setup()
    real_loss = t.loss
    calls = {"n": 0}

    def nan_loss(lp, batch, ctx):
        loss, m = real_loss(lp, batch, ctx)
        calls["n"] += 1
        return (loss * float("nan") if t.step >= 2 else loss), m

    t.loss = type("L", (), {"__call__": staticmethod(nan_loss), "needs": real_loss.needs, "epochs": 1,
                            "minibatches": 1, "reference_ema": 0.0, "prepare": real_loss.prepare,
                            "aggregation": "token_mean", "name": "sft"})()
    before = params(t.model)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row had a NaN/Inf loss"):
        t.fit()
    latest = latest_checkpoint(cfg["run_dir"])
    assert latest is not None
    state, _ = load_checkpoint(latest)
    assert state["skipped_steps"] == 3 and state["step"] == 5
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [0, 0, 1, 1, 1]
    # skipped steps left the weights as they were after step 2
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(latest, "model")).state_dict()
    assert any(not torch.equal(saved[k], before[k]) for k in before)
    assert all(torch.equal(saved[k], t.model.state_dict()[k]) for k in saved)


def test_run_with_eval_writes_everything(tmp_path):
    test_rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)} for i in range(6)]
    evalp = write_jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = tiny_config(tmp_path, eval={"prompts": evalp, "max_new_tokens": 4, "n": 2, "temperature": 1.0},
                      log={"progress": False, "tensorboard": True, "plots": True})
    t = trainer_for(cfg)
    summary = t.fit()
    run = cfg["run_dir"]
    assert set(summary["before"]) >= {"accuracy", "pass@1", "pass@2", "mean_length"}
    assert "after" in summary
    assert os.path.isfile(os.path.join(run, "plots", "train.png")) and os.path.isfile(os.path.join(run, "plots", "eval.png"))
    assert os.listdir(os.path.join(run, "tb"))
    lines = open(os.path.join(run, "samples", "eval-after.jsonl")).read().splitlines()
    assert len(lines) == 12 and "exact_match" in json.loads(lines[0])
    assert json.load(open(os.path.join(run, "summary.json")))["steps"] == 4
    # a finished run is not redone
    again = trainer_for(cfg).fit()
    assert again["steps"] == 4


def test_resume_mid_experience_batch_is_exact(tmp_path):
    """PSFT takes 4 optimizer steps per old-policy snapshot: stopping after 2 steps finishes the snapshot's batch
    (step 4) before saving, so resuming loses no examples and matches an uninterrupted run bit for bit."""
    common = dict(loss={"name": "psft", "minibatches": 4},
                  train={"steps": 8, "batch_size": 4, "micro_batch_size": 2, "lr": 2e-3})
    a = trainer_for(tiny_config(tmp_path / "a", **common))
    a.fit()
    b_cfg = tiny_config(tmp_path / "b", **common)
    b1 = trainer_for(b_cfg)
    b1.fit(max_steps=2)
    assert b1.step == 4
    b2 = trainer_for(b_cfg)
    b2.fit()
    pa, pb = params(a.model), params(b2.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_a_run_logs_only_to_its_own_train_log(tmp_path):
    """Two runs in one process (a pipeline, a notebook): the second run's messages go to its own train.log only."""
    import logging

    from align.trainer import _log_to_file

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    log = logging.getLogger("align")
    _log_to_file(str(a))
    log.info("first run")
    _log_to_file(str(b))
    log.info("second run")
    for h in log.handlers:
        h.flush()
    assert "first run" in (a / "train.log").read_text() and "second run" not in (a / "train.log").read_text()
    assert "second run" in (b / "train.log").read_text()


def test_a_restart_before_the_first_checkpoint_logs_one_before_eval(tmp_path):
    """A run killed before its first checkpoint left a step-0 "before" evaluation and some steps in metrics.jsonl;
    starting again evaluates again, and the file then holds that evaluation once (plots and reports read it)."""
    test_rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)} for i in range(4)]
    cfg = tiny_config(tmp_path, eval={"prompts": write_jsonl(tmp_path / "test.jsonl", test_rows), "max_new_tokens": 4})
    os.makedirs(cfg["run_dir"])
    with open(os.path.join(cfg["run_dir"], "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "kind": "eval", "accuracy": 0.5}) + "\n")
        f.write(json.dumps({"step": 1, "kind": "train", "loss": 9.0}) + "\n")
    trainer_for(cfg).fit()
    records = [json.loads(line) for line in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4]
    assert all(r.get("loss") != 9.0 for r in records)
