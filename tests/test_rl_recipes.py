"""The RL example configs load as configs; the GSM8K preparation turns dataset rows into prompt + answer rows.

The GPU recipe cannot run here (no GPU, no hub); what can be checked on CPU is checked: every key is a valid key with
a valid value, and the pieces it names (loss preset, engine, rewards, data preparation) are the ones that exist.
"""

import os

import pytest

from align.config import load_config
from align.tasks.gsm8k import final_answer, to_row

GSM8K = "examples/gsm8k_grpo_vllm.yaml"


def test_gsm8k_recipe_loads_and_names_a_real_model_vllm_and_zero3():
    cfg = load_config(GSM8K).stages[0].config
    b = cfg.backend
    assert (b.name, b.zero_stage, b.precision) == ("deepspeed", 3, "bf16")
    assert os.path.isfile(b.deepspeed_config)
    from align import dsconfig

    for world in (1, 8):  # one GPU, or one node of 8: the DeepSpeed config align would build is consistent
        dsconfig.check(cfg, world_size=world)
        ds = dsconfig.build(cfg, world, fill_auto=False)
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["train_batch_size"] == 64
    assert cfg.model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.engine.name == "vllm" and cfg.engine.sleep
    assert cfg.loss.name == "grpo" and cfg.rollout.n == 8
    assert [r.name for r in cfg.rollout.rewards] == ["numeric_match"]
    assert cfg.rollout.prompts == "data/gsm8k/train.jsonl" and cfg.eval.prompts == "data/gsm8k/test.jsonl"
    header = open(GSM8K, encoding="utf-8").read().split("\nrun_dir:")[0]
    assert "NEEDS A GPU" in header and "torchrun --nproc_per_node" in header and "align.tasks.gsm8k" in header


def test_gsm8k_rows_become_prompt_and_numeric_answer():
    row = to_row("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
                 "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                 "altogether in April and May.\n#### 72")
    assert row["answer"] == "72"
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith('final answer after "####".')
    assert final_answer("... so the total is $1,200.\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="'#### <answer>'"):
        final_answer("no marker here")
    from rollouts.rewards import numeric_match

    reward = numeric_match()
    assert reward(["q"] * 2, ["48/2 = 24, so 48 + 24 = 72.\n#### 72", "#### 71"], answer=["72", "72"]) == [1.0, 0.0]


def test_rl_quickstart_loads_as_two_stages():
    pipe = load_config("examples/rl_quickstart.yaml")
    sft, rl = (s.config for s in pipe.stages)
    assert [s.name for s in pipe.stages] == ["sft", "rl"]
    assert sft.loss.name == "sft" and sft.rollout is None and sft.train.steps < 600
    assert rl.rollout is not None and rl.rollout.prompts == "examples/data/arith/prompts.jsonl"
    assert [r.name for r in rl.rollout.rewards] == ["exact_match"]
    assert rl.eval.prompts == "examples/data/arith/test.jsonl" and rl.log.entropy


def test_align_losses_lists_the_rl_presets(capsys):
    from align.cli import main

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "rpg_ufkl", "rpg_urkl", "kl_pg"):
        assert f"\n{name}: " in out, name
