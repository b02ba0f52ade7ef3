"""Precomputed reference log-probs (align/reference.py) and DPO in the trainer.

- the precomputed path gives the same ref_logprobs, losses and weights as a reference model run every step;
- the cache is reused by a rerun (no reference pass, no reference model in memory) and invalidated by a change of
  weights or tokenised data; on resume the reference is the stage's initial weights, not the checkpoint's;
- chosen and rejected of a pair go through the policy in the same forward pass.
"""

import json
import os

import pytest
import torch
from helpers import tiny_config, write_jsonl
from test_training import params, trainer_for
from torch.testing import assert_close

import align.reference as reference
from align.collate import collate


def pair_rows(n, start=0):
    rows = []
    for i in range(start, start + n):
        a, b = i % 50, (i * 7) % 50
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": str(a + b + 1 + i % 3) * (1 + i % 2)}]})
    return rows


def dpo_config(tmp_path, n_pairs=32, **sections):
    cfg = tiny_config(tmp_path, **sections)
    cfg["data"]["train"] = write_jsonl(os.path.join(tmp_path, "pairs.jsonl"), pair_rows(n_pairs))
    if "loss" not in sections:
        cfg["loss"] = {"name": "dpo", "beta": 0.5}
    return cfg


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == "train"]


def test_precomputed_and_on_the_fly_reference_agree(tmp_path):
    common = dict(train={"steps": 4, "batch_size": 8, "micro_batch_size": 3, "lr": 3e-3})
    runs = {}
    for precompute in (True, False):
        cfg = dpo_config(tmp_path / str(precompute), reference={"precompute": precompute}, **common)
        t = trainer_for(cfg)
        t.setup()
        assert (t.ref_cache is not None) == precompute
        assert (t.ref_model is None) == precompute  # precomputed: no reference model is kept
        batch, units = collate(t.source.examples[:8], t.tokenizer.pad_token_id)
        t._fill_needs(batch, units)
        t.fit()
        runs[precompute] = (batch.extras["ref_logprobs"], train_losses(cfg["run_dir"]), params(t.model))
    (ref_a, loss_a, w_a), (ref_b, loss_b, w_b) = runs[True], runs[False]
    assert ref_a.abs().sum() > 0 and torch.all(ref_a[~batch.loss_mask] == 0)
    assert_close(ref_a, ref_b, atol=1e-5, rtol=0)
    assert len(loss_a) == 4 and loss_a == pytest.approx(loss_b, abs=1e-5)
    assert loss_a[0] == pytest.approx(0.693147, abs=1e-5)  # step 1: policy = reference, h = 0, loss = log 2
    assert loss_a[-1] < loss_a[0]
    for k in w_a:
        assert_close(w_a[k], w_b[k], atol=1e-5, rtol=1e-4)


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch, capsys):
    cfg = dpo_config(tmp_path, reference={"cache_dir": str(tmp_path / "cache")}, log={"progress": True})
    t = trainer_for(cfg)
    t.setup()
    assert "reference log-probs (train)" in capsys.readouterr().err  # the progress bar of the precompute pass
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("ref-train-")
    first = t.ref_cache.values.clone()

    def no_pass(*a, **k):
        raise AssertionError("the reference pass ran although a cache exists")

    monkeypatch.setattr(reference, "compute", no_pass)
    again = trainer_for(cfg).setup()  # same model, data and settings: read from disk
    assert torch.equal(again.ref_cache.values, first)
    monkeypatch.undo()

    # other tokenised data (a shorter max_length truncates the completions) → another key, a second file
    cfg2 = dpo_config(tmp_path / "b", reference={"cache_dir": str(tmp_path / "cache")}, data={"max_length": 18})
    trainer_for(cfg2).setup()
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_weights_fingerprint(tmp_path, tiny_dir):
    import shutil

    from align.tiny import save_tiny

    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    other = save_tiny(str(tmp_path / "other"), seed=3)
    fp = reference.weights_fingerprint(tiny_dir)
    assert fp == reference.weights_fingerprint(str(copy))
    assert fp != reference.weights_fingerprint(other)
    assert reference.weights_fingerprint(str(tmp_path / "no-such-model")) is None


@pytest.mark.parametrize("stop_after", [2, 4])
def test_resume_uses_the_initial_weights_as_reference(tmp_path, stop_after):
    """Stop after 2 steps (or finish all 4), delete the cache, set up again: the recomputed reference is the stage's
    initial model, not the checkpoint's or the final weights."""
    cfg = dpo_config(tmp_path, train={"steps": 4, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3})
    t = trainer_for(cfg)
    t.fit(max_steps=stop_after)
    original = t.ref_cache.values.clone()
    cache_dir = os.path.join(cfg["run_dir"], "ref_logprobs")
    for f in os.listdir(cache_dir):
        os.remove(os.path.join(cache_dir, f))
    t2 = trainer_for(cfg)
    t2.setup()
    assert t2.step == stop_after and t2._precompute_model is None  # loaded for the pass, then freed
    assert_close(t2.ref_cache.values, original, atol=1e-6, rtol=0)
    t2.fit()
    assert t2.step == 4


def test_chosen_and_rejected_share_one_forward(tmp_path, monkeypatch):
    """Every policy forward holds whole pairs, chosen (row 2i) next to its rejected (row 2i+1)."""
    import align.head as head

    cfg = dpo_config(tmp_path, train={"steps": 2, "batch_size": 8, "micro_batch_size": 2})
    t = trainer_for(cfg)
    t.setup()
    seen = []
    real = head.decoder_hidden

    def spy(model, ids, att):
        if torch.is_grad_enabled():
            seen.append(ids.clone())
        return real(model, ids, att)

    monkeypatch.setattr(head, "decoder_hidden", spy)  # the policy forward (head.forward_logprobs) runs through it
    t.fit()
    assert len(seen) == 2 * 4  # 2 steps × (8 pairs / 2 pairs per micro-batch): one forward per micro-batch
    prompt_end = t.tokenizer.convert_tokens_to_ids("<|assistant|>")
    for ids in seen:
        assert ids.shape[0] == 4  # 2 pairs = 4 rows in one forward
        for i in range(0, 4, 2):
            chosen, rejected = ids[i].tolist(), ids[i + 1].tolist()
            cut = chosen.index(prompt_end) + 1
            assert chosen[:cut] == rejected[:cut] and chosen != rejected  # same prompt, different completions


def test_dpo_run_learns_the_preference(tmp_path):
    cfg = dpo_config(tmp_path, n_pairs=16, train={"steps": 12, "batch_size": 16, "micro_batch_size": 16, "lr": 3e-3})
    t = trainer_for(cfg)
    t.fit()
    rows = [r for r in map(json.loads, open(os.path.join(cfg["run_dir"], "metrics.jsonl"))) if r["kind"] == "train"]
    assert rows[0]["rewards/accuracy"] == 0.0 and rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert rows[-1]["rewards/accuracy"] > 0.9 and rows[-1]["rewards/margins"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_eval_pairs_preference_accuracy(tmp_path):
    """eval.pairs: 0 / 0 before (the policy is the reference); after, the numbers an independent computation gives."""
    from transformers import AutoModelForCausalLM

    from align.head import decoder_hidden, token_logprobs
    from align.pref_eval import load_pairs

    held_out = write_jsonl(tmp_path / "held_out.jsonl", pair_rows(12, start=100))
    cfg = dpo_config(tmp_path, n_pairs=16, eval={"pairs": held_out},
                     train={"steps": 8, "batch_size": 16, "micro_batch_size": 16, "lr": 3e-3})
    t = trainer_for(cfg)
    summary = t.fit()
    before, after = summary["before"], summary["after"]
    assert before["pref_accuracy"] == 0.0 and before["pref_margin"] == 0.0
    assert 0.0 <= before["pref_logp_accuracy"] <= 1.0

    run = cfg["run_dir"]
    examples = load_pairs(held_out, t.tokenizer, t.cfg.data)
    batch, _ = collate(examples, t.tokenizer.pad_token_id)

    def seq_logps(path):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            lp, _ = token_logprobs(model, decoder_hidden(model, batch.input_ids, batch.attention_mask),
                                   batch.input_ids, batch.loss_mask)
        return (lp * batch.loss_mask).sum(1).double()

    pol, ref = seq_logps(os.path.join(run, "final")), seq_logps(os.path.join(run, "init-model"))
    h = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    assert after["pref_accuracy"] == pytest.approx((h > 0).double().mean().item())
    assert after["pref_margin"] == pytest.approx(h.mean().item(), abs=1e-4)
    assert after["pref_logp_accuracy"] == pytest.approx((pol[0::2] > pol[1::2]).double().mean().item())
    assert after["pref_margin"] > 0
