"""Best-of-N distillation through the shared trainer and rollout source, on a task a tiny random model learns in a few
steps (reward = the share of digits in a 4-character completion), with the transformers engine.

- `bond` (N = 4) lifts the policy's mean reward from the reference's towards the reference's Best-of-4 reward —
  measured on fresh samples — and not far past it (it distils BoN, it does not maximise the reward).
- `vbon`, BoN-SFT (`sft` + `rollout.select: best`), online DPO (`dpo` + `select: best_worst`) and `jbond` train and
  raise the reward, logging their selection / reference metrics.
- `jbond`'s anchor is the EMA of the policy after every step; its checkpoint holds the anchor, so stopping and resuming
  ends bit-identical to an uninterrupted run; the anchor's own samples are kept out of the engine-mismatch metrics.
"""

import copy
import json
import os

import pytest
import torch
from helpers import tiny_config, write_jsonl

from align.config import pipeline_from_dict
from align.evalcmd import mean_kl_on_samples
from align.trainer import Trainer
from losses.bon import expected_best_of_n
from rollouts.engine import SamplingParams
from rollouts.hf_engine import HFEngine


def digit_share(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def bon_config(tmp_path, loss, steps=30, **rollout):
    os.makedirs(tmp_path, exist_ok=True)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:", "answer": str(i)} for i in range(16)])
    return tiny_config(tmp_path, loss=loss,
                       train={"steps": steps, "batch_size": 8, "micro_batch_size": 64, "lr": 1e-2, "grad_clip": None},
                       rollout={"prompts": prompts, "n": 4, "max_new_tokens": 4, "temperature": 1.0,
                                "rewards": [{"name": "test_bon_training:digit_share"}], **rollout})


def trainer_for(cfg):
    pipe = pipeline_from_dict(cfg)
    return Trainer(pipe.stages[0].config, pipe.run_dir).setup()


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == kind]


def measure(trainer, model, reference, n=64, N=4):
    """Mean reward of one sample, expected Best-of-N reward, and per-token KL(π‖π_ref) on the samples."""
    prompts = trainer.source.source.prompts.examples
    comps = HFEngine(model, trainer.tokenizer, batch_size=256).generate(
        [p.prompt_ids for p in prompts], SamplingParams(temperature=1.0, max_new_tokens=4, seed=123), n=n)
    r = digit_share(None, [c.text for c in comps])
    groups = [r[i * n:(i + 1) * n] for i in range(len(prompts))]
    return {"reward": sum(r) / len(r), "bon": sum(expected_best_of_n(g, N) for g in groups) / len(groups),
            "kl": mean_kl_on_samples(model, reference, comps)}


def test_bond_moves_the_mean_reward_to_the_references_best_of_n(tmp_path):
    cfg = bon_config(tmp_path, {"name": "bond", "bon_n": 4, "reference_samples": 16})
    t = trainer_for(cfg)
    reference = copy.deepcopy(t.model).eval()
    before = measure(t, t.model, reference)
    t.fit()
    after = measure(t, t.model, reference)
    r0, target = before["reward"], before["bon"]
    assert target > r0 + 0.1, before  # Best-of-4 of the reference is clearly better than one sample
    assert r0 + 0.5 * (target - r0) <= after["reward"] <= target + 0.15, (before, after)
    rows = records(cfg["run_dir"])
    assert len(rows) == 30 and all(r["beta"] == pytest.approx(1 / 3) for r in rows)
    # 16 prompts × k = 16 reference samples, each prompt sampled once (cache), then only the policy's samples
    assert rows[-1]["samples/reference"] == 256 and rows[-1]["samples/policy"] == 30 * 8 * 4
    assert {"bon_reward_mean", "reward_mean", "kl_ref", "reference/prompts_cached"} <= set(rows[0])


@pytest.mark.parametrize("loss,rollout,logged", [
    ({"name": "vbon", "bon_n": 4}, {}, "bon_reward_mean"),
    ({"name": "sft"}, {"select": "best"}, "select/kept_reward_mean"),
    ({"name": "dpo", "beta": 0.1}, {"select": "best_worst"}, "select/tied_frac"),
    ({"name": "jbond"}, {"n": 1}, "nll_forward"),
])
def test_bon_family_trains_through_the_loop(tmp_path, loss, rollout, logged):
    cfg = bon_config(tmp_path, loss, steps=20, **rollout)
    t = trainer_for(cfg)
    t.fit()
    rows = records(cfg["run_dir"])
    assert len(rows) == 20 and logged in rows[0]
    first, last = (sum(r["reward/test_bon_training:digit_share"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first + 0.05, (first, last)
    for row in rows:  # the policy's samples come from the policy itself: no mismatch, no lag (anchor rows excluded)
        assert row["mismatch/logprob_diff_max"] < 1e-4 and row["mismatch/weight_lag"] == 0


def test_jbond_anchor_is_an_ema_of_the_policy_and_resumes_exactly(tmp_path):
    loss = {"name": "jbond", "reference_ema": 0.25}
    t = trainer_for(bon_config(tmp_path / "a", loss, steps=4, n=1))
    start = {k: v.clone() for k, v in t.model.named_parameters()}
    t.fit(max_steps=1)
    for name, p in t.ref_model.named_parameters():  # θ_anc = (1−γ)·θ_0 + γ·θ_1
        assert torch.equal(p, start[name].lerp(dict(t.model.named_parameters())[name], 0.25)), name
    t.fit()  # on to step 4 (checkpoint at 1 was not written: save_every 0; the run continues in-process)
    a = t

    b_cfg = bon_config(tmp_path / "b", loss, steps=4, n=1)
    trainer_for(b_cfg).fit(max_steps=2)
    assert os.path.isfile(os.path.join(b_cfg["run_dir"], "checkpoints", "step-00000002", "reference",
                                       "model.safetensors"))
    b = trainer_for(b_cfg)
    b.fit()
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    for (k, x), y in zip(a.ref_model.state_dict().items(), b.ref_model.state_dict().values()):
        assert torch.equal(x, y), k
    rows = records(b_cfg["run_dir"])
    assert rows[-1]["samples/reference"] == 4 * 8 * 2  # 2 anchor samples per prompt, every batch


def test_mean_kl_per_sequence_is_the_token_kl_summed_over_each_completion(tmp_path):
    t = trainer_for(bon_config(tmp_path, {"name": "sft"}, select="best"))
    reference = copy.deepcopy(t.model).eval()
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    comps = HFEngine(t.model, t.tokenizer).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, seed=0), n=3)
    per_token = mean_kl_on_samples(t.model, reference, comps)
    per_sequence = mean_kl_on_samples(t.model, reference, comps, per="sequence")
    tokens = sum(len(c.token_ids) for c in comps)
    assert per_token > 0 and per_sequence == pytest.approx(per_token * tokens / len(comps))
    with pytest.raises(ValueError, match="per must be 'token' or 'sequence'"):
        mean_kl_on_samples(t.model, reference, comps, per="prompt")


def test_bond_with_lora_samples_its_reference_from_the_base_model(tmp_path):
    """Under LoRA the reference is the policy with its adapters off (no copy): after the adapters have moved, the
    reference samples BOND ranks against are exactly the base model's samples, and the policy's adapters are back on
    after each reference call. A moving anchor (jbond) cannot be the adapters-off base: refused when the config loads."""
    from align.configio import ConfigError
    from align.models import load_model

    cfg = {**bon_config(tmp_path / "bond", {"name": "bond", "bon_n": 4, "reference_samples": 4}, steps=3),
           "peft": {"r": 4, "alpha": 8}}
    t = trainer_for(cfg)
    t.fit()
    ref_engine = t.source.steps[0].engine
    prompts = [p.prompt_ids for p in t.source.source.prompts.examples[:6]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, seed=7)
    base = load_model(os.path.join(cfg["run_dir"], "init-model"), t.cfg.model, torch.device("cpu")).eval()
    want = HFEngine(base, t.tokenizer).generate(prompts, sampling, n=4)
    got = ref_engine.generate(prompts, sampling, n=4)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    policy = HFEngine(t.model, t.tokenizer).generate(prompts, sampling, n=4)
    assert [c.token_ids for c in policy] != [c.token_ids for c in want]  # adapters on again, and they moved
    assert records(cfg["run_dir"])[-1]["samples/reference"] > 0
    with pytest.raises(ConfigError, match="moves its reference .* under LoRA"):
        pipeline_from_dict({**bon_config(tmp_path / "jbond", {"name": "jbond"}, n=1), "peft": {"r": 4}})
