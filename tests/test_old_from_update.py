"""π_old from the update's own forward: with one optimizer step per experience batch and a prepare that does not read
old_logprobs, the trainer skips the separate no-grad policy pass (TRL's num_iterations=1 shortcut). The run must be
the same as with the separate pass: losses, gradient norms, the engine mismatch metrics, and the TIS weight."""

import json
import os

import pytest
from helpers import tiny_config, write_jsonl

import losses
from align.config import pipeline_from_dict
from align.trainer import Trainer

GRPO = losses.get_loss_class("grpo")


class GrpoReadingOldInPrepare(GRPO):
    """grpo whose prepare declares it reads π_old: the trainer must then compute it before the update (old path)."""

    @property
    def prepare_needs(self):
        return frozenset(self.needs)


def digits(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _run(tmp_path, loss, steps=3):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(8)])
    cfg = tiny_config(tmp_path / loss.split(":")[-1], loss={"name": loss},
                      train={"steps": steps, "batch_size": 4, "micro_batch_size": 6, "lr": 1e-2},
                      rollout={"prompts": prompts, "n": 4, "max_new_tokens": 5, "temperature": 1.0,
                               "rewards": [{"name": "test_old_from_update:digits"}]})
    pipe = pipeline_from_dict(cfg)
    trainer = Trainer(pipe.stages[0].config, pipe.run_dir)
    trainer.setup()
    policy_passes = []
    no_grad = trainer._logprobs_no_grad

    def counted(model, *a, **kw):
        policy_passes.append(model is trainer.model)
        return no_grad(model, *a, **kw)

    trainer._logprobs_no_grad = counted
    trainer.fit()
    rows = [json.loads(line) for line in open(os.path.join(pipe.run_dir, "metrics.jsonl"))]
    return [r for r in rows if r["kind"] == "train"], sum(policy_passes), len(policy_passes)


def test_one_step_per_batch_takes_old_logprobs_from_the_update_forward(tmp_path):
    fast, fast_policy, fast_all = _run(tmp_path, "grpo")
    slow, slow_policy, slow_all = _run(tmp_path, "test_old_from_update:GrpoReadingOldInPrepare")
    assert fast_policy == 0 and fast_all == 3  # only the reference pass, once per experience batch
    assert slow_policy == 3 and slow_all == 6  # reference + policy
    for a, b in zip(fast, slow):
        assert a["reward_mean"] == b["reward_mean"]  # same rollouts (the engine shares the weights)
        for key in ("loss", "grad_norm", "kl_ref", "clip_frac", "mismatch/logprob_diff_mean",
                    "mismatch/logprob_diff_max", "mismatch/is_ratio_mean", "mismatch/tis_truncated"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["ratio_mean"] == 1.0 and a["kl_old"] == 0.0  # exactly π_old: the same forward, detached


def test_prepare_needs_of_the_pg_losses():
    assert GRPO().prepare_needs == {"rewards"}
    rloo = losses.get_loss_class("rloo")()  # KL in the reward: prepare reads π_old and π_ref
    assert rloo.prepare_needs == {"rewards", "old_logprobs", "ref_logprobs"}
    assert losses.get_loss_class("sft")().prepare_needs == frozenset()


def test_several_steps_per_batch_keep_the_separate_pass(tmp_path):
    """rpg_ufkl makes 4 optimizer steps per experience batch: π_old must be the weights before the first of them."""
    _, policy, _ = _run(tmp_path, "rpg_ufkl", steps=4)
    assert policy == 1  # one experience batch, one policy pass before its 4 updates
