"""The command line as a user meets it."""

import os
import subprocess
import sys

import yaml
from helpers import tiny_config

from align.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_losses_lists_each_loss_with_options(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in ("sft:", "dft:"):
        assert name in out
    assert "aggregation = 'token_mean'" in out


def test_train_then_plot(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "train.steps=3"]) == 0
    run = cfg["run_dir"]
    assert os.path.isdir(os.path.join(run, "final"))
    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["train"]["steps"] == 3  # the resolved config, overrides included
    assert main(["plot", run]) == 0
    assert os.path.isfile(os.path.join(run, "plots", "train.png"))


def test_bad_config_exits_2_with_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}, "train": {"lrr": 1}}))
    assert main(["train", str(path)]) == 2
    assert "unknown key 'train.lrr'; did you mean 'lr'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "align.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "train" in out.stdout and "losses" in out.stdout
