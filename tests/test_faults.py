"""Faults: kill -9 at random points, a full disk while saving, NaN gradients. Resume must be exact."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_config

from align import checkpoint as ckpt
from align.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from align.config import pipeline_from_dict
from align.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_SCRIPT = """
import json, sys
from align.config import pipeline_from_dict
from align.trainer import Trainer
pipe = pipeline_from_dict(json.loads(sys.argv[1]))
Trainer(pipe.stages[0].config, pipe.run_dir).fit()
"""


def trainer_for(cfg):
    pipe = pipeline_from_dict(cfg)
    return Trainer(pipe.stages[0].config, pipe.run_dir)


def fault_cfg(path):
    return tiny_config(path, train={"steps": 12, "batch_size": 8, "micro_batch_size": 4, "lr": 2e-3,
                                    "save_every": 3, "keep_checkpoints": 2})


def train_losses(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_identical(tmp_path):
    ref = trainer_for(fault_cfg(tmp_path / "ref"))
    ref.fit()
    want = {k: v.clone() for k, v in ref.model.state_dict().items()}
    want_losses = train_losses(ref.run_dir)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for trial, kill_at in enumerate(sorted(rng.sample(range(1, 12), 3))):
        cfg = fault_cfg(tmp_path / f"kill{trial}")
        proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(cfg)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        metrics = os.path.join(cfg["run_dir"], "metrics.jsonl")
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= kill_at:
                time.sleep(rng.random() * 0.3)  # land anywhere in the step / checkpoint write that follows
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(cfg["run_dir"])
        resumed = trainer_for(cfg)
        resumed.fit()
        assert resumed.step == 12, (kill_at, latest, resumed._stop_requested, resumed.total_steps, resumed.summary)
        got = resumed.model.state_dict()
        for k in want:
            assert torch.equal(got[k], want[k]), (kill_at, latest, k)
        assert train_losses(cfg["run_dir"]) == want_losses


def test_disk_full_while_saving_keeps_previous_and_says_so(tmp_path, monkeypatch):
    cfg = fault_cfg(tmp_path)
    t = trainer_for(cfg)
    t.fit(max_steps=3)  # writes step-3 (early stop saves)
    previous = latest_checkpoint(cfg["run_dir"])
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # part of the file lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    t2 = trainer_for(cfg)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-00000006 \(No space left on device\); "
                                              r"the previous checkpoint .*step-00000003 is intact"):
        t2.fit(max_steps=3)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert latest_checkpoint(cfg["run_dir"]) == previous
    assert not [d for d in os.listdir(os.path.join(cfg["run_dir"], "checkpoints")) if d.startswith(".tmp")]
    state, _ = load_checkpoint(previous)
    assert state["step"] == 3
    t3 = trainer_for(cfg)  # and training carries on from it once there is room
    t3.fit()
    assert t3.step == 12


def test_nan_gradient_with_finite_loss_is_skipped(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 4, "max_bad_steps": 3})
    t = trainer_for(cfg)
    t.setup()
    first = next(t.model.parameters())
    handle = first.register_hook(lambda g: torch.full_like(g, float("inf")) if t.step == 1 else g)
    before = None
    real_step = t._optimizer_step

    def step(*a, **k):
        nonlocal before
        if t.step == 1:
            before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        out = real_step(*a, **k)
        if t.step == 1:
            assert out["skipped"] == 1.0 and out["loss"] == out["loss"]  # finite loss, bad gradient
            for n, p in t.model.named_parameters():
                assert torch.equal(p, before[n]), n
        return out

    t._optimizer_step = step
    t.fit()
    handle.remove()
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [0, 1, 0, 0]


def test_safe_defaults():
    """trust_remote_code is off unless asked; every torch.load in the code base uses weights_only=True."""
    from align.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    offenders = []
    for pkg in ("align", "losses", "rollouts"):
        for root, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    src = open(os.path.join(root, f), encoding="utf-8").read()
                    for line in src.splitlines():
                        if "torch.load(" in line and "weights_only=True" not in line:
                            offenders.append(f"{f}: {line.strip()}")
                        if "trust_remote_code=True" in line:
                            offenders.append(f"{f}: {line.strip()}")
    assert not offenders, offenders
