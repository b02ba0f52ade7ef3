"""The bad-data corpus (tests/data/bad/): every case is an error naming file, row and field — or a documented,
counted skip — raised before training. Plus a property test: the data layer raises nothing but DataError."""

import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.config import DataConfig
from align.data import DataError, Tokenizer, load_examples, validate_row

BAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bad")

# file, (row, field) or None when the error is about the whole file, message pattern
ERRORS = [
    ("missing_field.jsonl", (2, "completion"), "is missing"),
    ("wrong_type.jsonl", (1, "completion"), "expected text or a list of messages, got int 6"),
    ("empty_completion.jsonl", (1, "completion"), "is empty"),
    ("chosen_equals_rejected.jsonl", (1, "rejected"), "identical to 'chosen'"),
    ("empty_prompt_pair.jsonl", (0, "prompt"), "is empty"),
    ("missing_chosen.jsonl", (1, "chosen"), "is missing"),
    ("unknown_role.jsonl", (0, "messages[0].role"), "unknown role 'bot'"),
    ("no_assistant.jsonl", (0, "messages"), "no assistant message"),
    ("invalid_utf8.jsonl", (1, None), "invalid UTF-8"),
    ("not_json.jsonl", (2, None), "not valid JSON"),
    ("array.json", (1, "prompt"), "expected text or a list of messages, got int 5"),
    ("unknown_columns.jsonl", None, "cannot tell the data format from the columns \\['question', 'response'\\]"),
    ("empty.jsonl", None, "file is empty \\(0 rows\\)"),
    ("blank_lines.jsonl", None, "0 rows"),
]


@pytest.mark.parametrize("name, where, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_corpus_errors_name_file_row_and_field(tokenizer, name, where, match):
    path = os.path.join(BAD, name)
    with pytest.raises(DataError, match=match) as e:
        load_examples(path, tokenizer, DataConfig(max_length=64))
    msg = str(e.value)
    assert msg.startswith(path), msg
    if where is not None:
        row, field = where
        assert e.value.row == row and e.value.field == field, msg
        assert f"row {row}" in msg


def test_long_prompt_is_skipped_and_counted(tokenizer):
    examples, stats, _ = load_examples(os.path.join(BAD, "long_prompt.jsonl"), tokenizer, DataConfig(max_length=64))
    assert len(examples) == 2 and stats.skipped_long_prompt == 1
    assert "1 rows skipped (prompt longer than max_prompt_length)" in stats.summary()


def test_chat_rows_with_a_tokenizer_without_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"chat.jsonl, row 0, field 'messages': .*tokenizer has no chat template"):
        load_examples(os.path.join(BAD, "chat.jsonl"), tok, DataConfig(max_length=64))


def test_rows_are_located_across_several_files(tokenizer):
    good = os.path.join(os.path.dirname(BAD), "..", "..", "examples", "data", "arith", "train.jsonl")
    bad = os.path.join(BAD, "empty_completion.jsonl")
    with pytest.raises(DataError, match=r"empty_completion.jsonl, row 1, field 'completion'"):
        load_examples(f"{good},{bad}", tokenizer, DataConfig(max_length=64, limit=None))


# --- property test ------------------------------------------------------------------------------------------------
text = st.text(min_size=0, max_size=12)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=16), text)
message = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                          st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "bot"]), scalar),
                          max_size=3)
value = st.one_of(scalar, st.lists(message, max_size=3), st.lists(scalar, max_size=2))
row = st.dictionaries(st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "text", "answer"]),
                      value, min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=row, fmt=st.sampled_from(["messages", "prompt_completion", "preference", "prompt", "text"]))
def test_random_rows_raise_only_data_errors(tokenizer, r, fmt):
    """validate + tokenise any row: it either works or raises DataError — never KeyError/TypeError/IndexError."""
    tk = Tokenizer(tokenizer, DataConfig(max_length=24, max_prompt_length=16), "random.jsonl")
    try:
        validate_row(r, 0, fmt, "random.jsonl")
        if fmt != "prompt":
            tk.example(r, 0, fmt)
        else:
            tk.prompt_ids(r["prompt"], 0)
    except DataError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=0, max_size=4))
def test_random_files_raise_only_data_errors(tokenizer, tmp_path_factory, rows):
    """The whole path from a file on disk (datasets reading, type coercion, validation, tokenising)."""
    path = tmp_path_factory.mktemp("prop") / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    try:
        load_examples(str(path), tokenizer, DataConfig(max_length=24), progress=False)
    except DataError:
        pass


def test_a_text_row_holding_chat_turns_is_a_data_error():
    """Found by the property test above: a `text` row whose value is a list of messages used to reach the tokenizer."""
    with pytest.raises(DataError, match=r"rows.jsonl, row 3, field 'text'.*expected plain text, got a list"):
        validate_row({"text": [{"role": "user", "content": "hi"}]}, 3, "text", "rows.jsonl")
