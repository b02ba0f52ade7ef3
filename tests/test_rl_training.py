"""The KL-regularised policy-gradient presets on the real online loop (tiny model, transformers engine, CPU).

The task is tests/test_online_training.py's: the reward is the share of digits in a 4-token completion, which a
random tiny model learns in a few steps. Here the built-in presets train it, and the loop's order is checked:
rollouts → rewards → advantages (loss.prepare) → epochs × minibatches optimizer steps on that experience → push.
"""

import pytest
import torch
from test_online_training import online_config, records, rises, trainer_for


def preset_config(tmp_path, loss, steps=20, **rollout):
    cfg = online_config(tmp_path, steps=steps, **rollout)
    cfg["loss"] = loss
    cfg["log"]["entropy"] = True
    return cfg


@pytest.mark.parametrize("loss", [{"name": "grpo"}, {"name": "rloo"}])
def test_reward_rises_under_the_preset(tmp_path, loss):
    cfg = preset_config(tmp_path, loss)
    trainer_for(cfg).fit()
    rows = records(cfg["run_dir"])
    assert len(rows) == 20
    ok, r = rises(rows, by=0.3)
    assert ok, r
    # the first step is on-policy and starts at the reference: KL to it is 0, then it grows as the policy moves
    assert abs(rows[0]["kl_ref"]) < 1e-6 and rows[-1]["kl_ref"] > 0.05, [x["kl_ref"] for x in rows]
    assert rows[-1]["entropy"] < rows[0]["entropy"]  # the policy sharpens on digits
    assert all(x["mismatch/logprob_diff_max"] < 1e-4 for x in rows)


def test_one_experience_batch_is_rollout_prepare_updates_push(tmp_path, monkeypatch):
    """epochs = minibatches = 2: each experience is generated and scored once, its advantages computed once, then
    4 optimizer steps reuse it (ratio 1 and zero drift only on the first), and only then is the engine synced."""
    cfg = preset_config(tmp_path, {"name": "grpo", "epochs": 2, "minibatches": 2}, steps=8)
    t = trainer_for(cfg)
    t.setup()
    calls = []

    def spy(obj, name, tag):
        fn = getattr(obj, name)

        def wrapped(*a, **kw):
            calls.append(tag)
            return fn(*a, **kw)

        setattr(obj, name, wrapped)

    spy(t.engine, "generate", "rollout")
    scorer = type(t.source.scorer)
    score = scorer.__call__
    monkeypatch.setattr(scorer, "__call__", lambda self, *a, **kw: calls.append("reward") or score(self, *a, **kw))
    spy(t.loss, "prepare", "advantages")
    spy(t.backend, "step", "update")
    spy(t.engine_sync, "after_updates", "push")
    t.fit()
    assert calls == ["rollout", "reward", "advantages", "update", "update", "update", "update", "push"] * 2
    rows = records(cfg["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, 9))
    for k, row in enumerate(rows):
        first = k % 4 == 0  # the first step of an experience batch runs the policy that sampled it
        assert (abs(row["kl_old"]) < 1e-7) == first and (abs(row["ratio_mean"] - 1) < 1e-6) == first, (k, row)
    assert all(r["mismatch/weight_lag"] == 0 for r in rows)  # the engine had every update when it sampled
    # an experience batch is train.batch_size × minibatches = 16 prompts × n = 8 samples; a step takes half of it
    assert rows[0]["sequences"] == 8 * 8


def test_log_probs_are_those_of_the_sampling_temperature(tmp_path):
    """Sampling at T = 0.5: old / reference log-probs (and the ratio) use softmax(z / T) like TRL and verl; the engine
    mismatch still compares the engine's temperature-1 log-probs with the trainer's temperature-1 log-probs."""
    from align.collate import collate
    from align.head import decoder_hidden, token_logprobs

    cfg = preset_config(tmp_path, {"name": "grpo"}, steps=1, temperature=0.5)
    t = trainer_for(cfg)
    t.setup()
    batch, units = collate(t.source.next_batch(), t.tokenizer.pad_token_id)
    metrics = t._fill_needs(batch, units)
    with torch.no_grad():
        hidden = decoder_hidden(t.model, batch.input_ids, batch.attention_mask)
        at_t, _ = token_logprobs(t.model, hidden, batch.input_ids, batch.loss_mask, temperature=0.5)
        at_1, _ = token_logprobs(t.model, hidden, batch.input_ids, batch.loss_mask)
    torch.testing.assert_close(batch.extras["old_logprobs"], at_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.extras["ref_logprobs"], at_t, atol=1e-5, rtol=0)
    assert (batch.extras["old_logprobs"] - at_1).abs().max() > 0.1  # a different distribution
    assert metrics["mismatch/logprob_diff_max"] < 1e-4  # engine (T = 1) vs trainer at T = 1


def test_rl_runs_get_a_page_of_rl_curves(tmp_path):
    import json

    from align.plot import plot_run

    def write(run, rows):
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [p.rsplit("/", 1)[1] for p in plot_run(str(run))]

    rl = [{"step": s, "kind": "train", "reward_mean": 0.1 * s, "kl_ref": 0.01 * s, "entropy": 1 - 0.1 * s}
          for s in range(1, 5)] + [{"step": 4, "kind": "eval", "accuracy": 0.5}]
    assert sorted(write(tmp_path / "rl", rl)) == ["eval.png", "rl.png", "train.png"]
    assert write(tmp_path / "sft", [{"step": 1, "kind": "train", "loss": 1.0}]) == ["train.png"]


def test_train_epochs_counts_every_update_of_an_experience_batch(tmp_path):
    """train.epochs = 1 over 16 prompts, batch_size 8, loss epochs = minibatches = 2: one experience batch of 16 prompts
    gives 2 × 2 optimizer steps (not 16 / 8 = 2)."""
    cfg = preset_config(tmp_path, {"name": "grpo", "epochs": 2, "minibatches": 2})
    cfg["train"] = {**cfg["train"], "steps": None, "epochs": 1}
    t = trainer_for(cfg)
    t.setup()
    assert t.total_steps == 4
