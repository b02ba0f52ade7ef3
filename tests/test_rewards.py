"""Reward functions: verifiers on worked examples, the batched runner (async, weights, failing and hanging
functions), user functions by import path, and a reward model with its own tokenizer."""

import asyncio
import time

import pytest

from rollouts.rewards import describe_rewards, load_reward
from rollouts.scoring import RewardError, RewardTerm, Scorer


def run(name, completions, answers=None, **options):
    fn = load_reward(name, options)
    fields = {} if answers is None else {"answer": answers}
    return fn(["p"] * len(completions), completions, **fields)


def test_exact_and_numeric_worked_examples():
    assert run("exact_match", ["85", " 85 ", "85.", "Eighty"], ["85", "85", "85", "eighty"]) == [1, 1, 0, 1]
    # numeric: the last number of the completion against the answer's number
    assert run("numeric_match", ["the sum is 1,234", "12.50", "x = -3", "none"], ["1234", "12.5", "-3", "0"]) == \
        [1, 1, 1, 0]


def test_regex_worked_examples():
    # format reward: is there an <answer> tag?
    assert run("regex", ["<answer>7</answer>", "7"], pattern=r"<answer>.*?</answer>") == [1, 0]
    # with a field: the first group must equal the answer
    assert run("regex", ["<answer> 7 </answer>", "<answer>8</answer>", "no tag"], ["7", "7", "7"],
               pattern=r"<answer>(.*?)</answer>", field="answer") == [1, 0, 0]
    assert run("regex", ["ABC", "abc!"], pattern="abc", fullmatch=True, flags="i") == [1, 0]
    with pytest.raises(ValueError, match="does not compile"):
        load_reward("regex", {"pattern": "("})
    with pytest.raises(ValueError, match="unknown flag"):
        load_reward("regex", {"pattern": "a", "flags": "x"})


def test_math_verify_worked_examples():
    pytest.importorskip("math_verify", reason="the math reward needs math-verify")
    got = run("math", [r"so the answer is $\boxed{\frac{1}{2}}$", "0.5", r"$\boxed{3}$", "I don't know"],
              ["0.5", r"\frac{1}{2}", "4", "1"])
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_math_without_math_verify_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("math_verify"):
            raise ImportError("no math_verify")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ValueError, match="needs math-verify: pip install math-verify"):
        load_reward("math")


def test_unknown_reward_and_bad_options():
    with pytest.raises(ValueError, match="unknown reward 'exact_mach'; did you mean 'exact_match'"):
        load_reward("exact_mach")
    with pytest.raises(ValueError, match="bad options"):
        load_reward("exact_match", {"colum": "x"})
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_reward("no_such_module:fn")


# ------------------------------------------------------------------------------------------------- the runner
def length_reward(prompts, completions, **fields):
    assert fields.get("timeout", [1])[0] in (1, 2, 3)
    return [float(len(c)) for c in completions]


async def async_reward(prompts, completions, answer):
    await asyncio.sleep(0)
    return [float(c == a) for c, a in zip(completions, answer)]


def picky(prompts, completions, answer):  # no **fields: gets only `answer`
    return [1.0] * len(completions)


def fails_on_boom(prompts, completions, **fields):
    if any("boom" in c for c in completions):
        raise ValueError("cannot score this")
    return [1.0] * len(completions)


def hangs_on_slow(prompts, completions, **fields):
    if any("slow" in c for c in completions):
        time.sleep(30)
    return [1.0] * len(completions)


def user_factory(bonus=0.0):
    return lambda prompts, completions, **f: [1.0 + bonus] * len(completions)


# "timeout" as a column name must reach the function, not the runner's own deadline argument
FIELDS = [{"answer": "a", "timeout": 1}, {"answer": "b", "timeout": 2}, {"answer": "c", "timeout": 3}]


def test_weighted_sum_async_and_column_filtering():
    s = Scorer([RewardTerm("len", length_reward, 0.5), RewardTerm("ok", async_reward, 2.0),
                RewardTerm("picky", picky, 1.0)])
    out = s(["p"] * 3, ["a", "xx", "c"], FIELDS)
    assert out.terms == {"len": [1.0, 2.0, 1.0], "ok": [1.0, 0.0, 1.0], "picky": [1.0, 1.0, 1.0]}
    assert out.total == [0.5 + 2 + 1, 1 + 0 + 1, 0.5 + 2 + 1]


def test_user_function_by_import_path():
    fn = load_reward("test_rewards:length_reward")
    assert fn(["p"], ["abc"]) == [3.0]
    assert load_reward("test_rewards:user_factory", {"bonus": 2.0})(["p"], ["x"]) == [3.0]
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward("test_rewards:nope")


def test_raising_function_names_the_sample():
    s = Scorer([RewardTerm("mine", fails_on_boom)])
    with pytest.raises(RewardError) as e:
        s(["p0", "p1", "p2"], ["fine", "it goes boom", "fine"], FIELDS)
    msg = str(e.value)
    assert "reward 'mine' raised ValueError: cannot score this on sample 1 (1 of 3 samples failed)" in msg
    assert "completion='it goes boom'" in msg and "prompt='p1'" in msg and "'answer': \"'b'\"" in msg
    assert "reward_on_error: default" in msg


def test_raising_function_with_default_scores_and_counts():
    s = Scorer([RewardTerm("mine", fails_on_boom)], on_error="default", default=-1.0)
    out = s(["p"] * 3, ["boom", "fine", "boom"], FIELDS)
    assert out.terms["mine"] == [-1.0, 1.0, -1.0]  # the good sample keeps its real score
    assert out.defaulted == {"mine": [0, 2]}
    s(["p"], ["boom"], FIELDS[:1])
    assert s.failures == {"mine": 3}


def test_hanging_function_times_out_naming_the_sample():
    s = Scorer([RewardTerm("slowpoke", hangs_on_slow)], timeout_s=0.5)
    t0 = time.time()
    with pytest.raises(RewardError, match=r"'slowpoke' did not return within 0.5 s on sample 2 .*'slow one'"):
        s(["p"] * 3, ["a", "b", "slow one"], FIELDS)
    assert time.time() - t0 < 10  # one deadline for the batch, one for the per-sample diagnosis
    d = Scorer([RewardTerm("slowpoke", hangs_on_slow)], timeout_s=0.5, on_error="default", default=0.25)
    assert d(["p"] * 3, ["a", "slow", "b"], FIELDS).terms["slowpoke"] == [1.0, 0.25, 1.0]
    assert d.failures == {"slowpoke": 1}


def test_bad_return_values_are_errors():
    s = Scorer([RewardTerm("short", lambda p, c, **f: [1.0])])
    # the batch returned 1 value for 3; sample by sample it works, so the values are used (and a warning logged)
    assert s(["p"] * 3, ["a", "b", "c"], FIELDS).terms["short"] == [1.0, 1.0, 1.0]
    nan = Scorer([RewardTerm("nan", lambda p, c, **f: [float("nan") if x == "b" else 0.0 for x in c])])
    with pytest.raises(RewardError, match=r"'nan' returned nan \(not finite\) at position 0 on sample 1"):
        nan(["p"] * 3, ["a", "b", "c"], FIELDS)
    with pytest.raises(ValueError, match="on_error must be one of raise, default"):
        Scorer([RewardTerm("x", length_reward)], on_error="ignore")


def test_describe_lists_builtins():
    text = describe_rewards()
    for name in ("exact_match", "numeric_match", "regex", "math", "reward_model"):
        assert f"\n{name}: " in "\n" + text
    assert "pattern = (required)" in text and "package.module:function" in text


# -------------------------------------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny sequence-classification Llama whose tokenizer numbers the characters differently from the policy's."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.tiny import CHARSET, build_tokenizer

    tok = build_tokenizer(CHARSET[::-1])  # same characters, reversed ids
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = str(tmp_path_factory.mktemp("rm"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_scores_decoded_text_with_its_own_tokenizer(reward_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fn = load_reward("reward_model", {"path": reward_model_dir, "batch_size": 2, "chat_template": False})
    prompts, completions = ["What is 1+2?", "Say hi", "x"], ["3", "hello there", "yy"]
    got = fn(prompts, completions)

    rm_tok = AutoTokenizer.from_pretrained(reward_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    assert rm_tok("3")["input_ids"] != tokenizer("3")["input_ids"]  # the two tokenizers disagree on ids
    want = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            want.append(float(rm(**rm_tok(p + c, return_tensors="pt")).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-5)
    # the policy's ids fed to the reward model would score something else
    with torch.no_grad():
        wrong = float(rm(input_ids=torch.tensor([tokenizer(prompts[0] + completions[0])["input_ids"]])).logits[0, 0])
    assert abs(wrong - want[0]) > 1e-4


def test_reward_model_uses_its_chat_template_for_chat_prompts(reward_model_dir):
    fn = load_reward("reward_model", {"path": reward_model_dir})
    texts = fn.texts(["<|user|>hi<|assistant|>"], ["yo"], prompt_messages=[[{"role": "user", "content": "hi"}]])
    assert texts == ["<|user|>hi<|assistant|>yo</s>"]  # rendered by the reward model's template, not the policy's
    assert fn.texts(["plain "], ["text"]) == ["plain text"]


def test_reward_model_bad_path():
    with pytest.raises(ValueError, match="cannot load a sequence-classification model from"):
        load_reward("reward_model", {"path": "/nonexistent/rm"})


def test_align_rewards_command(capsys):
    from align.cli import main

    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "exact_match: " in out and "reward_model: " in out and "tolerance = 1e-06" in out
