"""Data formats → token ids and loss masks; malformed rows → DataError naming file, row and field."""

import copy

import pytest
from helpers import write_jsonl

from align.config import DataConfig
from align.data import DataError, Tokenizer, load_examples, load_prompts, read_rows


def cfg(**kw):
    return DataConfig(**{"max_length": 64, **kw})


def masked_text(tokenizer, sample):
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def test_chat_prompt_completion_trains_on_answer_and_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "1+2?"}],
                                               "completion": [{"role": "assistant", "content": "3"}]}])
    (ex,), stats, fmt = load_examples(path, tokenizer, cfg())
    s = ex.samples[0]
    assert fmt == "prompt_completion"
    assert tokenizer.decode(s.input_ids) == "<|user|>1+2?<|assistant|>3</s>"
    assert masked_text(tokenizer, s) == "3</s>"
    assert stats.loss_tokens == 2


def test_string_prompt_completion_appends_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}])
    (ex,), _, _ = load_examples(path, tokenizer, cfg())
    assert masked_text(tokenizer, ex.samples[0]) == "cd</s>"
    (ex,), _, _ = load_examples(path, tokenizer, cfg(chat_template="always"))
    assert tokenizer.decode(ex.samples[0].input_ids) == "<|user|>ab<|assistant|>cd</s>"


def test_messages_train_on_every_assistant_turn(tokenizer, tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,), _, fmt = load_examples(path, tokenizer, cfg())
    assert fmt == "messages"
    assert masked_text(tokenizer, ex.samples[0]) == "a1</s>a2</s>"
    # the same masks without {% generation %} markers (rendering the conversation turn by turn)
    tok2 = copy.deepcopy(tokenizer)
    tok2.chat_template = tok2.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (ex2,), _, _ = load_examples(path, tok2, cfg())
    assert ex2.samples[0].input_ids == ex.samples[0].input_ids
    assert ex2.samples[0].loss_mask == ex.samples[0].loss_mask


def test_preference_pairs_share_the_prompt(tokenizer, tmp_path):
    p = [{"role": "user", "content": "1+1?"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "chosen": [{"role": "assistant", "content": "2"}],
                                               "rejected": [{"role": "assistant", "content": "3"}]}])
    (ex,), _, fmt = load_examples(path, tokenizer, cfg())
    assert fmt == "preference" and len(ex.samples) == 2
    assert [masked_text(tokenizer, s) for s in ex.samples] == ["2</s>", "3</s>"]
    # implicit prompt (shared leading messages), TRL's extract_prompt
    path = write_jsonl(tmp_path / "e.jsonl", [{"chosen": p + [{"role": "assistant", "content": "2"}],
                                               "rejected": p + [{"role": "assistant", "content": "3"}]}])
    (ex2,), _, _ = load_examples(path, tokenizer, cfg())
    assert [s.input_ids for s in ex2.samples] == [s.input_ids for s in ex.samples]


def test_text_and_prompts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    (ex,), _, fmt = load_examples(path, tokenizer, cfg())
    assert fmt == "text" and masked_text(tokenizer, ex.samples[0]) == "ello</s>"
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "answer": 7}])
    (row,) = load_prompts(path, tokenizer, cfg())
    assert tokenizer.decode(row.prompt_ids) == "<|user|>hi<|assistant|>" and row.fields == {"answer": 7}


def test_truncation_and_long_prompts_are_counted(tokenizer, tmp_path):
    rows = [{"prompt": "ab", "completion": "c" * 20}, {"prompt": "x" * 30, "completion": "y"},
            {"prompt": "ab", "completion": "cd"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats, _ = load_examples(path, tokenizer, cfg(max_length=10, max_prompt_length=8))
    assert len(examples) == 2 and stats.truncated == 1 and stats.skipped_long_prompt == 1
    assert len(examples[0].samples[0].input_ids) == 10
    assert "1 completions truncated" in stats.summary() and "1 rows skipped" in stats.summary()


P = [{"role": "user", "content": "q"}]
A = [{"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("rows, row, field, match", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], 1, "completion", "is missing"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}], 1, "completion", "missing \\(null\\)"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}], 1, "completion", "is empty"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 5}], None, None, "could not be read|expected text"),
    ([{"prompt": P, "chosen": A, "rejected": A}], 0, "rejected", "identical to 'chosen'"),
    ([{"prompt": P, "completion": [{"role": "robot", "content": "x"}]}], 0, "completion[0].role", "unknown role"),
    ([{"prompt": P, "completion": [{"role": "assistant", "content": ""}]}], 0, "completion[0].content", "assistant message is empty"),
    ([{"messages": [{"role": "user", "content": "x"}]}], 0, "messages", "no assistant message"),
    ([{"prompt": P, "completion": "text"}], 0, "completion", "both be text or both be messages"),
    ([{"foo": 1}], None, None, "cannot tell the data format"),
])
def test_bad_rows(tokenizer, tmp_path, rows, row, field, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match) as e:
        load_examples(path, tokenizer, cfg())
    assert "bad.jsonl" in str(e.value)
    if row is not None:
        assert e.value.row == row and e.value.field == field
        assert f"row {row}, field '{field}'" in str(e.value)


def test_broken_files(tokenizer, tmp_path):
    bad = tmp_path / "utf.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"utf.jsonl, row 1: invalid UTF-8"):
        read_rows(str(bad))
    broken = tmp_path / "json.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"json.jsonl, row 1: not valid JSON"):
        read_rows(str(broken))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="0 rows"):
        read_rows(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_chat_rows_need_a_template(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": P, "completion": A}])
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        load_examples(path, tok, cfg())


def test_prompt_only_data_cannot_train_a_dataset_loss(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1"}])
    with pytest.raises(DataError, match="holds prompts only"):
        load_examples(path, tokenizer, cfg())


def test_parquet_and_comma_separated_files(tokenizer, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list([{"prompt": "c", "completion": "d"}]).to_parquet(str(tmp_path / "b.parquet"))
    examples, _, _ = load_examples(f"{tmp_path}/a.parquet,{tmp_path}/b.parquet", tokenizer, cfg())
    assert len(examples) == 2
