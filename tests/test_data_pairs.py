"""Bad preference rows stop the run before training with the file, row and field — never a silent NaN later.

And a trainer given the wrong kind of data for a pairwise loss, or a non-preference eval.pairs file, says so.
"""

import os

import pytest
from helpers import tiny_config, write_jsonl

from align.config import DataConfig, pipeline_from_dict
from align.data import DataError, load_examples
from align.trainer import Trainer, TrainingError

U = lambda c: [{"role": "user", "content": c}]  # noqa: E731
A = lambda c: [{"role": "assistant", "content": c}]  # noqa: E731
GOOD = {"prompt": U("What is 1+1?"), "chosen": A("2"), "rejected": A("3")}


@pytest.mark.parametrize("rows, row, field, message", [
    ([GOOD, {"prompt": U("q"), "rejected": A("3")}], 1, "chosen",
     "is missing. a preference dataset needs the columns chosen, rejected"),
    ([GOOD, {"prompt": U("q"), "chosen": None, "rejected": A("3")}], 1, "chosen", "is missing (null)"),
    ([GOOD, {"prompt": U("q"), "chosen": A("3"), "rejected": A("3")}], 1, "rejected",
     "is identical to 'chosen' (the pair carries no preference)"),
    ([{"prompt": "q", "chosen": "a", "rejected": "a"}], 0, "rejected", "is identical to 'chosen'"),
    ([{"chosen": U("q") + A("2"), "rejected": U("q") + A("2")}], 0, "rejected", "is identical to 'chosen'"),
    ([{"prompt": "", "chosen": "a", "rejected": "b"}], 0, "prompt", "is empty. every row needs a non-empty prompt"),
    ([GOOD, {"prompt": [], "chosen": A("2"), "rejected": A("3")}], 1, "prompt", "expected a non-empty list"),
    ([{"prompt": U("  "), "chosen": A("2"), "rejected": A("3")}], 0, "prompt",
     "has only empty messages. every pair needs a non-empty prompt"),
    ([{"chosen": A("2"), "rejected": U("3") + A("x")}], 0, "prompt",
     "is missing and chosen / rejected share no leading messages"),
    ([{"prompt": None, "chosen": "a", "rejected": "b"}], 0, "prompt", "is missing. text preference rows need a prompt"),
    ([{"prompt": "q", "chosen": "a", "rejected": "  "}], 0, "rejected", "is empty"),
    ([{"prompt": "q", "chosen": A("2"), "rejected": A("3")}], 0, "chosen",
     "prompt and completions must all be text or all be chat messages"),
    ([{"prompt": U("q"), "chosen": A("2"), "rejected": "3"}], 0, "rejected", "must all be text or all be chat"),
    ([{"prompt": U("q"), "chosen": U("2"), "rejected": A("3")}], 0, "chosen", "has no assistant message"),
    # completions that differ only beyond max_length tokenise to the same ids
    ([{"prompt": U("What is 1+1?"), "chosen": A("2222222222a"), "rejected": A("2222222222b")}], 0, "rejected",
     "tokenises to the same ids as 'chosen' (after truncation to data.max_length=24)"),
])
def test_bad_pair_rows(tokenizer, tmp_path, rows, row, field, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer, DataConfig(max_length=24), progress=False)
    assert (e.value.row, e.value.field) == (row, field)
    assert message in str(e.value) and str(path) in str(e.value)


def test_pairwise_loss_on_other_data_and_other_loss_on_pairs(tmp_path):
    cfg = tiny_config(tmp_path, loss={"name": "dpo"})  # tiny_config's data are prompt/completion rows
    pipe = pipeline_from_dict(cfg)
    with pytest.raises(TrainingError, match="loss 'dpo' trains on preference pairs but .* is 'prompt_completion' data"):
        Trainer(pipe.stages[0].config, pipe.run_dir).setup()
    pairs = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "chosen": A("4")}])
    cfg = tiny_config(tmp_path / "b", data={"train": pairs})
    pipe = pipeline_from_dict(cfg)
    with pytest.raises(TrainingError, match="loss 'sft' does not use preference pairs"):
        Trainer(pipe.stages[0].config, pipe.run_dir).setup()


def test_eval_pairs_must_be_pairs(tmp_path):
    cfg = tiny_config(tmp_path, eval={"pairs": os.path.join(tmp_path, "train.jsonl")})
    pipe = pipeline_from_dict(cfg)
    with pytest.raises(DataError, match="eval.pairs needs prompt/chosen/rejected rows, got 'prompt_completion' data"):
        Trainer(pipe.stages[0].config, pipe.run_dir).setup()
