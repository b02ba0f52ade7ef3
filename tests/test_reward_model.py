"""The `reward` loss (losses/reward.py) and reward models trained on the shared loop.

- the Bradley–Terry loss with margin and centring term equals a value worked out by hand, and its metrics;
- training a reward model on the quickstart pairs raises its pairwise accuracy (train metrics and held-out pairs);
- the loss equals TRL's RewardTrainer.compute_loss on the same model and batch (1e-5), with and without margin / centring;
- a trained reward model used as a rollout reward (`reward_model`, by path) scores the policy's *decoded text* with its
  own tokenizer, which here numbers the characters differently from the policy's: the score equals the one the model
  gives the same pair tokenised as in training;
- config and data errors name what to fix; `align eval` on a reward-model run reports held-out pairwise accuracy.
"""

import json
import math
import os

import pytest
import torch
from conftest import ARITH, REPO
from helpers import ctx_for, tiny_config, write_jsonl
from torch.testing import assert_close

import losses
from align.config import DataConfig, ModelConfig, load_config
from align.configio import ConfigError
from align.data import DataError, Tokenizer
from losses import Batch

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 128}


def _reward_loss(**opts):
    cls = losses.get_loss_class("reward")
    return cls(cls.Options(**opts))


def _batch(n_rows, **extras):
    mask = torch.ones(n_rows, 3, dtype=torch.bool)
    mask[:, 0] = False
    return Batch(input_ids=torch.zeros(n_rows, 3, dtype=torch.long), attention_mask=torch.ones(n_rows, 3, dtype=bool),
                 loss_mask=mask, group_ids=torch.arange(n_rows) // 2, extras=extras)


# ------------------------------------------------------------------------------------------------ the loss itself
def test_reward_loss_hand_worked_value():
    # rows (chosen, rejected) interleaved: pair 1 = (2.0, 0.5), pair 2 = (-1.0, 1.0)
    scores = torch.tensor([2.0, 0.5, -1.0, 1.0], requires_grad=True)
    batch = _batch(4)
    loss, m = _reward_loss()(scores, batch, ctx_for(batch.loss_mask))
    # −log σ(1.5) = log(1 + e^−1.5) = 0.2014133;  −log σ(−2) = log(1 + e^2) = 2.1269280;  mean = 1.1641707
    assert loss.item() == pytest.approx(1.1641707, abs=1e-6)
    assert m["rewards/accuracy"] == 0.5 and m["rewards/margins"] == pytest.approx(-0.25)
    assert m["rewards/chosen"] == pytest.approx(0.5) and m["rewards/rejected"] == pytest.approx(0.75)
    loss.backward()
    # ∂/∂r_w = −σ(−d)/P: −σ(−1.5)/2 = −0.0912128, −σ(2)/2 = −0.4403985; ∂/∂r_l the opposite
    assert_close(scores.grad, torch.tensor([-0.0912128, 0.0912128, -0.4403985, 0.4403985]), atol=1e-6, rtol=0)

    # margin m = (0.5, 1.0) per pair (on both rows) and centring c = 0.01:
    # pair 1: log(1 + e^−(1.5−0.5)) = 0.3132617, + 0.01·(2.5)² = 0.0625  → 0.3757617
    # pair 2: log(1 + e^(2+1))      = 3.0485874, + 0.01·0²     = 0       → 3.0485874;  mean = 1.7121746
    batch = _batch(4, margin=torch.tensor([0.5, 0.5, 1.0, 1.0]))
    loss, m = _reward_loss(center_rewards_coefficient=0.01)(scores.detach(), batch, ctx_for(batch.loss_mask))
    assert loss.item() == pytest.approx(1.7121746, abs=1e-6)
    assert m["center_term"] == pytest.approx(0.03125)


def test_reward_loss_is_a_mean_over_the_optimizer_batch_pairs():
    """Two micro-batches of one pair each, in a context counting 2 pairs, sum to the one-batch loss."""
    scores = torch.tensor([2.0, 0.5, -1.0, 1.0])
    whole = _batch(4)
    full, _ = _reward_loss()(scores, whole, ctx_for(whole.loss_mask))
    ctx = ctx_for(whole.loss_mask, num_micro_batches=2)
    parts = sum(_reward_loss()(scores[i:i + 2], whole.select([i, i + 1]), ctx)[0] for i in (0, 2))
    assert_close(parts, full)


def test_reward_loss_options_and_shapes():
    with pytest.raises(losses.OptionError, match="center_rewards_coefficient must be a number ≥ 0"):
        _reward_loss(center_rewards_coefficient=-1.0)
    batch = _batch(2)
    with pytest.raises(ValueError, match=r"expected \(B,\) scores"):
        _reward_loss()(torch.zeros(2, 3), batch, ctx_for(batch.loss_mask))
    cls = losses.get_loss_class("reward")
    assert cls.output == "scores" and cls.needs == {"pairs"} and set(losses.OUTPUTS) == {"logprobs", "scores"}


# ------------------------------------------------------------------------------------------- TRL RewardTrainer
def _pair_rows(n=6, margin=False):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{3 * i}?"}],
             "chosen": [{"role": "assistant", "content": str(4 * i)}],
             "rejected": [{"role": "assistant", "content": str(4 * i + 1) * (1 + i % 3)}]} for i in range(n)]
    if margin:
        for i, r in enumerate(rows):
            r["margin"] = 0.25 * i
    return rows


@pytest.mark.parametrize("margin, center", [(False, None), (True, 0.01)])
def test_reward_loss_equals_trl(tiny_dir, tokenizer, tmp_path, margin, center):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from align.collate import collate
    from align.models import load_model
    from align.scores import forward_scores

    rows = _pair_rows(margin=margin)
    torch.manual_seed(0)
    trl_model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, dtype=torch.float32)
    trl_model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=None,
                        center_rewards_coefficient=center, per_device_train_batch_size=len(rows))
    trainer = RewardTrainer(model=trl_model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(trl_rows)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)

    # align: its own tokenisation (must give TRL's ids), interleaved pairs, the same score head weights
    tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    examples = [tk.example(r, i, "preference") for i, r in enumerate(rows)]
    for ex, t in zip(examples, trl_rows):
        assert [s.input_ids for s in ex.samples] == [t["chosen_ids"], t["rejected_ids"]]
    batch, _ = collate(examples, tokenizer.pad_token_id)
    model = load_model(tiny_dir, ModelConfig(name=tiny_dir), torch.device("cpu"), output="scores",
                       pad_token_id=tokenizer.pad_token_id)
    model.load_state_dict(trl_model.state_dict())  # the same fresh score head
    _, scores, _ = forward_scores(model, batch.input_ids, batch.attention_mask)
    loss, _ = _reward_loss(center_rewards_coefficient=center or 0.0)(scores, batch, ctx_for(batch.loss_mask))
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # a non-trivial value: the random head separates the pairs
    assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- training on the loop
def _rm_config(tmp_path, steps, **sections):
    cfg = tiny_config(tmp_path, model={"tiny": TINY},
                      data={"train": os.path.join(ARITH, "pairs.jsonl"), "limit": 512, "max_length": 32},
                      loss={"name": "reward"}, eval={"pairs": os.path.join(ARITH, "test_pairs.jsonl"),
                                                     "pairs_limit": 64, "every": 0},
                      train={"steps": steps, "batch_size": 32, "micro_batch_size": 32, "lr": 3e-3})
    cfg.update(sections)
    return cfg


@pytest.mark.slow
def test_pairwise_accuracy_rises_on_the_quickstart_pairs(tmp_path):
    """60 steps on 128 quickstart pairs (a 50k-parameter model from random weights): the pairwise accuracy on those
    pairs, measured by the eval.pairs pass before and after, and the running train metric both rise."""
    from align.trainer import Trainer

    with open(os.path.join(ARITH, "pairs.jsonl"), encoding="utf-8") as f:
        pairs = write_jsonl(tmp_path / "pairs.jsonl", [json.loads(line) for line in f][:128])
    cfg = _rm_config(tmp_path, 60)
    cfg["data"] = {"train": pairs, "max_length": 32}
    cfg["eval"] = {"pairs": pairs, "every": 0}
    cfg = load_config(None, [], base=cfg).stages[0].config
    summary = Trainer(cfg).fit()
    before, after = summary["before"], summary["after"]
    assert after["pref_accuracy"] > before["pref_accuracy"] + 0.1 and after["pref_accuracy"] > 0.6, (before, after)
    assert after["pref_margin"] > before["pref_margin"]
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        train = [json.loads(line) for line in f if '"rewards/accuracy"' in line]
    first = sum(r["rewards/accuracy"] for r in train[:10]) / 10
    last = sum(r["rewards/accuracy"] for r in train[-10:]) / 10
    assert last > first + 0.04, (first, last)
    # final/ is a sequence-classification checkpoint with one output that transformers loads on its own
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(summary["final_model"])
    assert saved.architectures == ["LlamaForSequenceClassification"] and saved.num_labels == 1
    assert saved.pad_token_id is not None


# ----------------------------------------------------------------------- a trained RM as a rollout reward, by path
@pytest.fixture(scope="module")
def trained_rm_other_tokenizer(tmp_path_factory):
    """A reward model trained by align (3 steps) from a tiny model whose tokenizer numbers characters in reverse."""
    from align.tiny import CHARSET, build_model, build_tokenizer
    from align.trainer import Trainer

    root = tmp_path_factory.mktemp("rm_other_tok")
    base = str(root / "base")
    tok = build_tokenizer(CHARSET[::-1])  # same characters, reversed ids
    build_model(tok, seed=3, **TINY).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = _rm_config(root, 3, model={"name": base})
    cfg["data"]["limit"] = 96
    cfg["eval"] = {"pairs": None}
    summary = Trainer(load_config(None, [], base=cfg).stages[0].config).fit()
    return summary["final_model"]


def test_trained_reward_model_scores_decoded_text_with_its_own_tokenizer(trained_rm_other_tokenizer, tokenizer):
    from align.collate import collate
    from align.models import load_model, load_tokenizer
    from align.scores import forward_scores
    from rollouts.rewards import load_reward

    path = trained_rm_other_tokenizer
    rm_tok = load_tokenizer(path)
    assert rm_tok("85")["input_ids"] != tokenizer("85")["input_ids"]  # the policy's ids would mean other characters
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": b}]}
            for q, a, b in [("What is 40+45?", "85", "75"), ("What is 7+8?", "15", "5")]]
    # what the policy side hands the reward: its decoded prompt text and completion text, plus the chat messages
    policy_tk = Tokenizer(tokenizer, DataConfig(max_length=64), "rows")
    prompts = [tokenizer.decode(policy_tk.prompt_ids(r["prompt"], i)) for i, r in enumerate(rows) for _ in range(2)]
    completions = [r[k][0]["content"] for r in rows for k in ("chosen", "rejected")]
    messages = [r["prompt"] for r in rows for _ in range(2)]
    fn = load_reward("reward_model", {"path": path, "batch_size": 3})
    got = fn(prompts, completions, prompt_messages=messages)

    # the reward model's own scores of the same pairs, tokenised as in its training (its tokenizer, its template)
    rm_tk = Tokenizer(rm_tok, DataConfig(max_length=64), "rows")
    batch, _ = collate([rm_tk.example(r, i, "preference") for i, r in enumerate(rows)], rm_tok.pad_token_id)
    model = load_model(path, ModelConfig(name=path), torch.device("cpu"), output="scores")
    with torch.no_grad():
        want = forward_scores(model.eval(), batch.input_ids, batch.attention_mask)[1]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == 4  # four different texts, four different scores
    # the policy's token ids pushed straight into the reward model would score something else
    with torch.no_grad():
        wrong = model(input_ids=torch.tensor([tokenizer.apply_chat_template(
            rows[0]["prompt"] + rows[0]["chosen"], tokenize=True, return_dict=True)["input_ids"]])).logits[0, 0]
    assert abs(float(wrong) - got[0]) > 1e-4


# ------------------------------------------------------------------------------------------------------ errors
def test_reward_config_errors(tmp_path):
    def build(**sections):
        return load_config(None, [], base=_rm_config(tmp_path, 2, **sections))

    cfg = _rm_config(tmp_path, 2)
    cfg["eval"]["prompts"] = os.path.join(ARITH, "test.jsonl")
    with pytest.raises(ConfigError, match="cannot generate: set eval.prompts: null"):
        load_config(None, [], base=cfg)
    with pytest.raises(ConfigError, match="cannot generate rollouts: drop the `rollout:` section"):
        build(rollout={"prompts": os.path.join(ARITH, "prompts.jsonl")})
    with pytest.raises(ConfigError, match=r"LoRA \(`peft:`\) is for policies so far"):
        build(peft={})
    stages = {"stages": [{"name": "rl", "rollout": {"prompts": "p.jsonl",
                                                    "rewards": [{"name": "reward_model", "path": "@stage:rm"}]}}]}
    with pytest.raises(ConfigError, match=r"stages\[0\].rollout.rewards\[0\].path: '@stage:rm' names no earlier stage"):
        load_config(None, [], base={**_rm_config(tmp_path, 2), **stages})


def test_margin_column_errors(tmp_path):
    from align.data import load_examples

    rows = _pair_rows(4, margin=True)
    good, _, _ = load_examples(write_jsonl(tmp_path / "ok.jsonl", rows), _tok(), DataConfig(max_length=64))
    assert [s.fields["margin"] for s in good[1].samples] == [0.25, 0.25]
    rows[2]["margin"] = "big"
    with pytest.raises(DataError, match=r"row 2.*margin.*expected a finite number"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", rows), _tok(), DataConfig(max_length=64))
    rows[2].pop("margin")
    with pytest.raises(DataError, match=r"row 2.*margin.*is missing, but .* row 0 has one"):
        load_examples(write_jsonl(tmp_path / "mixed.jsonl", rows), _tok(), DataConfig(max_length=64))


def _tok():
    from align.tiny import build_tokenizer

    return build_tokenizer()


# ------------------------------------------------------------------------------------------- the RLHF pipeline
@pytest.mark.slow
def test_rlhf_pipeline_example_shrunk(tmp_path, monkeypatch, capsys):
    """examples/rlhf_pipeline.yaml with every stage shrunk to a few steps: sft → rm → grpo against rm/final."""
    import yaml

    from align import pipeline
    from align.cli import main

    monkeypatch.chdir(REPO)
    with open("examples/rlhf_pipeline.yaml", encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    run_dir = str(tmp_path / "run")
    raw.update(run_dir=run_dir, model={"name": "tiny", "tiny": TINY},
               log={"progress": False, "tensorboard": False, "plots": False})
    raw["eval"]["limit"] = 8
    sft, rm, rl = raw["stages"]
    sft["train"].update(steps=3)
    rm["train"].update(steps=3)
    rm["eval"]["pairs_limit"] = 16
    rl["train"].update(steps=2, batch_size=2)
    results = pipeline.run(load_config(None, [], base=raw))

    assert list(results) == ["sft", "rm", "rl"]
    rm_final = os.path.join(run_dir, "rm", "final")
    with open(os.path.join(run_dir, "rl", "config.yaml"), encoding="utf-8") as f:
        rl_cfg = yaml.safe_load(f)
    assert rl_cfg["model"]["name"] == os.path.join(run_dir, "sft", "final")  # the policy starts from SFT
    assert rl_cfg["rollout"]["rewards"][0]["path"] == rm_final  # and is rewarded by the learned reward model
    assert set(results["rm"]["after"]) >= {"pref_accuracy", "pref_margin", "pref_sign_accuracy"}
    after = results["rl"]["after"]
    assert set(after) >= {"accuracy", "reward/exact_match", "reward/reward_model", "reward/reward_model>0",
                          "gap/reward_model"}
    assert after["gap/reward_model"] == pytest.approx(after["reward/reward_model>0"] - after["accuracy"])
    report = pipeline.report(results)
    assert "[rl] reward/reward_model " in report and "[rl] gap/reward_model " in report

    # `align eval` on the reward-model stage: its held-out pairwise accuracy, as the run measured it
    capsys.readouterr()
    assert main(["eval", os.path.join(run_dir, "rm")]) == 0
    out = capsys.readouterr().out
    assert "pref_accuracy" in out
    with open(os.path.join(run_dir, "rm", "eval.json"), encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    assert metrics["pref_accuracy"] == pytest.approx(results["rm"]["after"]["pref_accuracy"])
