"""Data adapters for installed task packages: reasoning-gym prompts + its verifier as a reward, CHAMP pairs.

Skipped, with the reason, when reasoning-gym / champ-dataset is not installed (the README's test command installs
both).
"""

import importlib.util
import json

import pytest

from align.config import DataConfig

HAVE_RG = importlib.util.find_spec("reasoning_gym") is not None
HAVE_CHAMP = importlib.util.find_spec("champ_dataset") is not None
needs_rg = pytest.mark.skipif(not HAVE_RG, reason="needs reasoning-gym: pip install reasoning-gym")
needs_champ = pytest.mark.skipif(not HAVE_CHAMP, reason="needs champ-dataset: pip install champ-dataset")


# ---------------------------------------------------------------------------------------------- reasoning-gym
@needs_rg
def test_task_rows_are_prompt_rows_with_the_entry():
    import reasoning_gym

    from align.data import validate_row
    from align.tasks.reasoning_gym import FORMAT_PROMPT, task_rows

    rows = task_rows("chain_sum", 5, seed=3, config={"max_terms": 2, "max_digits": 2})
    ds = reasoning_gym.create_dataset("chain_sum", size=5, seed=3, max_terms=2, max_digits=2)
    for i, (row, entry) in enumerate(zip(rows, ds)):
        validate_row(row, i, "prompt", "rows")
        assert row["prompt"] == [{"role": "system", "content": FORMAT_PROMPT},
                                 {"role": "user", "content": entry["question"]}]
        assert (row["answer"], row["task"], row["question"]) == (entry["answer"], "chain_sum", entry["question"])
        assert json.loads(row["metadata"])["expression"] == entry["metadata"]["expression"]
    assert task_rows("chain_sum", 5, seed=3, config={"max_terms": 2, "max_digits": 2}) == rows  # deterministic
    plain = task_rows("chain_sum", 2, seed=3, system="none")
    assert [m["role"] for m in plain[0]["prompt"]] == ["user"]


@needs_rg
def test_exclude_keeps_a_held_out_set_out_and_drops_repeats():
    from align.tasks.reasoning_gym import task_rows

    cfg = {"min_terms": 2, "max_terms": 2, "max_digits": 1}  # few distinct questions: repeats are frequent
    test = task_rows("chain_sum", 20, seed=2, config=cfg)
    train = task_rows("chain_sum", 60, seed=1, config=cfg, exclude={r["question"] for r in test})
    qs = [r["question"] for r in train]
    assert len(set(qs)) == 60 and not set(qs) & {r["question"] for r in test}


@needs_rg
def test_unknown_task_and_bad_config_name_the_problem():
    from align.tasks.reasoning_gym import parse_config, task_rows

    with pytest.raises(ValueError, match="unknown reasoning-gym task 'chain_sums'; did you mean chain_sum"):
        task_rows("chain_sums", 3, seed=0)
    with pytest.raises(ValueError, match="expected key=value"):
        parse_config(["max_terms"])
    assert parse_config(["max_terms=3", "allow_negation=false"]) == {"max_terms": 3, "allow_negation": False}


@needs_rg
def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    from align.cli import main

    out = str(tmp_path / "x.jsonl")
    assert main(["data", "reasoning-gym", "chain_sum", "--size", "2", "--out", out, "--config", "max_termz=2"]) == 2
    assert "unexpected keyword argument 'max_termz'" in capsys.readouterr().err
    assert main(["data", "reasoning-gym", "chan_sum", "--size", "2", "--out", out]) == 2
    assert "did you mean chain_sum" in capsys.readouterr().err


@needs_rg
def test_verifier_scores_a_right_and_a_wrong_answer():
    from rollouts.rewards import load_reward

    from align.tasks.reasoning_gym import task_rows

    rows = task_rows("chain_sum", 3, seed=5, config={"max_terms": 2, "max_digits": 2})
    fields = {k: [r[k] for r in rows] for k in ("answer", "task", "question", "metadata")}
    prompts = [r["question"] for r in rows]
    right = [f"Let me add.\n<answer>{a}</answer>" for a in fields["answer"]]
    wrong = [f"<answer>{int(a) + 1}</answer>" for a in fields["answer"]]
    tag = load_reward("reasoning_gym")
    assert tag(prompts, right, **fields) == [1.0, 1.0, 1.0]
    assert tag(prompts, wrong, **fields) == [0.0, 0.0, 0.0]
    assert tag(prompts, [f"The answer is {a}." for a in fields["answer"]], **fields) == [0.0] * 3  # no tags
    prose = load_reward("reasoning_gym", {"extract": "last_number", "task": "chain_sum"})
    assert prose(prompts, [f"{r['question']} The answer is {r['answer']}." for r in rows], **fields) == [1.0] * 3
    assert prose(prompts, ["I do not know."] * 3, **fields) == [0.0] * 3


@needs_rg
def test_partial_credit_and_strict():
    from rollouts.rewards import load_reward

    fields = {"answer": ["7"], "task": ["chain_sum"], "metadata": ["{}"], "question": ["3 + 4 ="]}
    # chain_sum's own scorer gives len(oracle)/len(answer) when the answer only contains the oracle
    assert load_reward("reasoning_gym", {"extract": "full"})(["q"], ["7 apples"], **fields) == [pytest.approx(1 / 8)]
    assert load_reward("reasoning_gym", {"extract": "full", "strict": True})(["q"], ["7 apples"], **fields) == [0.0]
    assert load_reward("reasoning_gym", {"extract": "full", "strict": True})(["q"], [" 7 "], **fields) == [1.0]


@needs_rg
def test_reward_errors_name_the_fix():
    from rollouts.rewards import load_reward

    with pytest.raises(ValueError, match="unknown task 'chain_sums'"):
        load_reward("reasoning_gym", {"task": "chain_sums"})
    with pytest.raises(ValueError, match="extract must be one of"):
        load_reward("reasoning_gym", {"extract": "first_word"})
    fn = load_reward("reasoning_gym")
    with pytest.raises(KeyError, match="align data reasoning-gym"):
        fn(["q"], ["<answer>1</answer>"])
    with pytest.raises(KeyError, match="`task` column"):
        fn(["q"], ["<answer>1</answer>"], answer=["1"])


@needs_rg
def test_cli_writes_prompts_the_evaluation_reads(tmp_path, tokenizer, tiny_dir, capsys):
    """align data reasoning-gym → load_prompts → evaluate's scoring with the reward named in a config."""
    from align.cli import main
    from align.config import RewardSpec
    from align.data import load_prompts
    from align.evaluate import build_rewards, score

    test, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    assert main(["data", "reasoning-gym", "chain_sum", "--size", "4", "--seed", "2", "--out", str(test),
                 "--config", "max_terms=2", "max_digits=1", "--system", "none"]) == 0
    assert main(["data", "reasoning-gym", "chain_sum", "--size", "8", "--seed", "1", "--out", str(train),
                 "--config", "max_terms=2", "max_digits=1", "--exclude", str(test)]) == 0
    assert capsys.readouterr().out.split() == [str(test), str(train)]
    prompts = load_prompts(str(test), tokenizer, DataConfig())
    assert len(prompts) == 4 and prompts[0].fields["task"] == "chain_sum"
    rewards = build_rewards([RewardSpec(name="reasoning_gym", options={"extract": "last_number"})])
    answers = [p.fields["answer"] for p in prompts]
    got = score(rewards, [p.prompt_text for p in prompts], [f"It is {a}" for a in answers[:2]] + ["0.5", "x"],
                [p.fields for p in prompts])
    assert got.terms["reasoning_gym"][:2] == [1.0, 1.0] and got.terms["reasoning_gym"][3] == 0.0


# ------------------------------------------------------------------------------------------------------ CHAMP
@needs_champ
def test_champ_pairs_reference_over_flawed_solution():
    import champ_dataset

    from align.data import validate_row
    from align.tasks.champ import INSTRUCTION, champ_pairs, reference_solution

    rows = champ_pairs()
    assert len(rows) == 444  # 540 annotated model solutions, 96 of them judged free of mistakes
    assert len({r["id"] for r in rows}) <= 270
    ds = champ_dataset.load("v0")
    for i, row in enumerate(rows[:: 37]):
        validate_row(row, i, "preference", "champ")
        problem = ds.problems[row["id"]]
        assert row["prompt"] == [{"role": "user", "content": f"{INSTRUCTION}\n\n{problem.text}"}]
        assert row["chosen"] == [{"role": "assistant", "content": reference_solution(problem)}]
        flawed = row["rejected"][0]["content"]
        assert row["first_wrong_step"] != "No mistake" and row["first_wrong_step"].strip() in flawed
        assert row["author"] in ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
        assert row["answer"] == problem.answer
    first = rows[0]
    assert first["id"] == "P_Combinatorics_1" and first["chosen"][0]["content"].endswith("239 such strings.")
    train, test = champ_pairs(split="train"), champ_pairs(split="test")
    assert len(train) + len(test) == 444 and not {r["id"] for r in train} & {r["id"] for r in test}
    assert len({r["id"] for r in test}) * 5 >= len({r["id"] for r in rows})  # every 5th problem held out
    with pytest.raises(ValueError, match="split must be one of"):
        champ_pairs(split="dev")


@needs_champ
def test_champ_pairs_tokenise_as_preference_data(tmp_path, tokenizer, capsys):
    from align.cli import main
    from align.data import load_examples

    out = tmp_path / "pairs.jsonl"
    assert main(["data", "champ", "--out", str(out)]) == 0
    assert "444 pairs" in capsys.readouterr().out
    examples, stats, fmt = load_examples(str(out), tokenizer, DataConfig(max_length=512, limit=6), progress=False)
    assert fmt == "preference" and len(examples) == 6
    for ex in examples:
        chosen, rejected = ex.samples
        assert chosen.num_loss_tokens > 0 and rejected.num_loss_tokens > 0 and chosen.input_ids != rejected.input_ids
