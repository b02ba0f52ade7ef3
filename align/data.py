"""Datasets in, tokenised examples out: the formats users already have, checked row by row before training.

Formats (one per file, detected from the columns or set with ``data.format``):

| format              | columns                              | trained tokens                         |
|---------------------|--------------------------------------|----------------------------------------|
| messages            | messages (list of {role, content})   | assistant turns                        |
| prompt_completion   | prompt, completion                   | the completion                         |
| preference          | prompt, chosen, rejected             | chosen and rejected completions        |
| prompt              | prompt (+ answer, other columns)     | none (prompts for generation / eval)   |
| text                | text                                 | every token                            |

Strings or chat messages both work; chat messages go through the tokenizer's chat template. Reading uses
Hugging Face ``datasets``; the prompt/completion split of chat rows follows TRL's convention (the completion starts
where the tokenised prompt and prompt+completion diverge). A malformed row raises :class:`DataError` naming the
file, the row, the field and the fix, before any training starts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from rollouts.types import Example, Sample

from .config import DataConfig

log = logging.getLogger("align")

FORMATS = ("messages", "prompt_completion", "preference", "prompt", "text")
ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # `{% generation %}` marks assistant tokens
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data row (or file) that cannot be used. The message says where and what to do."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, fix: str = ""):
        self.source, self.row, self.field = source, row, field
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}" + (f". {fix}" if fix else ""))


@dataclass
class PromptRow:
    """A prompt for generation, with the dataset's other columns (``answer``, ...) for reward functions."""

    prompt_ids: list[int]
    prompt_text: str
    fields: dict[str, Any]
    index: int
    prompt_messages: list | None = None  # the chat messages when the prompt is a conversation (reward models)


@dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    skipped_long_prompt: int = 0  # prompts that leave no room for a completion (counted, not trained on)
    truncated: int = 0  # completions cut at max_length
    tokens: int = 0  # tokens in the kept examples
    loss_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.examples} examples from {self.rows} rows, {self.tokens} tokens ({self.loss_tokens} trained)"
        if self.truncated:
            s += f"; {self.truncated} completions truncated at max_length"
        if self.skipped_long_prompt:
            s += f"; {self.skipped_long_prompt} rows skipped (prompt longer than max_prompt_length)"
        return s


# --------------------------------------------------------------------------------------------------- reading rows
def _local_files(spec: str) -> list[str] | None:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    files: list[str] = []
    for p in parts:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "*")) if os.path.splitext(f)[1] in _LOCAL_BUILDERS)
            if not found:
                raise DataError(p, None, None, "folder has no .json/.jsonl/.parquet/.csv files")
            files += found
        elif os.path.exists(p):
            files.append(p)
        elif any(ch in p for ch in "*?"):
            files += sorted(glob.glob(p))
        elif os.path.splitext(p)[1] in _LOCAL_BUILDERS or p.startswith((".", "/")):
            raise DataError(p, None, None, "file does not exist", "check the path in data.train / eval.prompts")
        else:
            return None  # a hub dataset name
    return files


def _scan_json_lines(path: str) -> None:
    """Find the first undecodable / unparsable line of a .jsonl file and raise a DataError naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, None, f"invalid UTF-8 at byte {e.start}",
                                "re-encode the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})",
                                "each line of a .jsonl file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")


class Rows(list):
    """The rows of one or more files, remembering which file (and which row of it) each came from."""

    def __init__(self, rows=(), spans: list[tuple[str, int]] | None = None, name: str = ""):
        super().__init__(rows)
        self.spans = spans or [(name, len(self))]  # (file, number of rows), in order
        self.name = name

    def where(self, i: int) -> tuple[str, int]:
        """(file, row within that file) of global row ``i``."""
        for name, n in self.spans:
            if i < n:
                return name, i
            i -= n
        return self.name, i


def _parse_json_file(path: str) -> list[dict]:
    """Rows of a .json (a list of objects, or {column: [values]}) or .jsonl (one object per line) file."""
    if path.endswith(".jsonl"):
        _scan_json_lines(path)
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(path, None, None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"column": [values...]} or {"data": [rows...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(path, None, None, "expected a list of JSON objects (one per row)")
    return data


def _read_file(path: str, builder: str) -> list[dict]:
    if os.path.getsize(path) == 0:
        raise DataError(path, None, None, "file is empty (0 rows)", "point the config at a file with rows")
    if builder == "json":
        # Read JSON ourselves rather than through `datasets`: Arrow's type inference coerces mixed columns (a "2"
        # in one row and a 6 in another become the integers 2 and 6), silently changing the data, and its errors
        # cannot name the row. The json module keeps every value as written and lets validation name the row.
        return _parse_json_file(path)
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=[path], split="train").to_list()
    except Exception as e:
        raise DataError(path, None, None, f"could not be read: {type(e).__name__}: {str(e)[:300]}") from None


def read_rows(spec: str, split: str = "train", limit: int | None = None) -> tuple[Rows, str]:
    """Rows of local json/jsonl/parquet/csv files (comma-separated, globs or a folder) or of a hub dataset."""
    files = _local_files(spec)
    if files is None:
        import datasets

        try:
            rows = Rows(datasets.load_dataset(spec, split=split).to_list(), name=spec)
        except Exception as e:
            raise DataError(spec, None, None, f"is not a local file and could not be loaded as a hub dataset "
                            f"({type(e).__name__}: {str(e)[:200]})", "check the path or the dataset name") from None
    else:
        if not files:
            raise DataError(spec, None, None, "no files match")
        exts = {os.path.splitext(f)[1] for f in files}
        builders = {_LOCAL_BUILDERS.get(e) for e in exts}
        if None in builders or len(builders) != 1:
            raise DataError(spec, None, None, f"unsupported or mixed file types {sorted(exts)}",
                            "use .json/.jsonl, .parquet or .csv files of one kind")
        builder = builders.pop()
        all_rows, spans = [], []
        for f in files:
            part = _read_file(f, builder)
            all_rows += part
            spans.append((f, len(part)))
        rows = Rows(all_rows, spans, name=spec)
    if limit is not None:
        rows = Rows(rows[:limit], _cut_spans(rows.spans, limit), name=rows.name)
    if not rows:
        raise DataError(spec, None, None, "has 0 rows", "point the config at a file with data")
    return rows, spec


def _cut_spans(spans: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    out = []
    for name, n in spans:
        take = min(n, limit)
        if take > 0:
            out.append((name, take))
        limit -= take
    return out


# ------------------------------------------------------------------------------------------------------ validation
def detect_format(rows: list[dict], source: str) -> str:
    cols = set(rows[0])
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompt"
    raise DataError(source, None, None, f"cannot tell the data format from the columns {sorted(cols)}",
                    "use one of: messages | prompt+completion | prompt+chosen+rejected | prompt(+answer) | text")


def _check_messages(value: Any, source: str, row: int, name: str, *, need_assistant: bool = False,
                    allow_empty_content: bool = False) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(source, row, name, f"expected a non-empty list of {{role, content}} messages, got "
                        f"{_show(value)}")
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(source, row, where, f"expected a mapping with 'role' and 'content', got {_show(m)}")
        if m["role"] not in ROLES:
            raise DataError(source, row, f"{where}.role", f"unknown role {m['role']!r}", f"use one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(source, row, f"{where}.content", f"expected text, got {_show(m['content'])}")
        if not allow_empty_content and not m["content"].strip() and m["role"] == "assistant":
            raise DataError(source, row, f"{where}.content", "assistant message is empty",
                            "remove the row or give it a completion")
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise DataError(source, row, name, "has no assistant message to train on")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_text(value: Any, source: str, row: int, name: str, what: str) -> None:
    if value is None:
        raise DataError(source, row, name, "is missing (null)", f"every row needs a {what}")
    if isinstance(value, list):
        _check_messages(value, source, row, name, need_assistant=name in ("completion", "chosen", "rejected"))
        return
    if not isinstance(value, str):
        raise DataError(source, row, name, f"expected text or a list of messages, got {type(value).__name__} "
                        f"{_show(value)}")
    if not value.strip():
        raise DataError(source, row, name, f"is empty", f"every row needs a non-empty {what}")


def validate_row(row: dict, i: int, fmt: str, source: str) -> None:
    """Raise DataError for a row that cannot be used as ``fmt``."""
    if not isinstance(row, dict):
        raise DataError(source, i, None, f"expected a mapping of columns, got {type(row).__name__}")
    required = {
        "messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",),
        "preference": ("chosen", "rejected"), "prompt": ("prompt",),
    }[fmt]
    for name in required:
        if name not in row:
            raise DataError(source, i, name, "is missing", f"a {fmt} dataset needs the columns {', '.join(required)}")
    if fmt == "messages":
        _check_messages(row["messages"], source, i, "messages", need_assistant=True)
    elif fmt == "text":
        _check_text(row["text"], source, i, "text", "text")
    elif fmt == "prompt":
        _check_text(row["prompt"], source, i, "prompt", "prompt")
    elif fmt == "prompt_completion":
        _check_text(row["prompt"], source, i, "prompt", "prompt")
        _check_text(row["completion"], source, i, "completion", "completion")
        if isinstance(row["prompt"], list) != isinstance(row["completion"], list):
            raise DataError(source, i, "completion", "prompt and completion must both be text or both be messages")
    elif fmt == "preference":
        prompt = row.get("prompt")
        if prompt is not None:
            _check_text(prompt, source, i, "prompt", "prompt")
            if isinstance(prompt, list) and not any(m["content"].strip() for m in prompt):
                raise DataError(source, i, "prompt", "has only empty messages", "every pair needs a non-empty prompt")
        elif not isinstance(row["chosen"], list):
            raise DataError(source, i, "prompt", "is missing", "text preference rows need a prompt column")
        _check_text(row["chosen"], source, i, "chosen", "chosen completion")
        _check_text(row["rejected"], source, i, "rejected", "rejected completion")
        for name in ("chosen", "rejected"):
            if prompt is not None and isinstance(prompt, list) != isinstance(row[name], list):
                raise DataError(source, i, name, "prompt and completions must all be text or all be chat messages")
        if row["chosen"] == row["rejected"]:
            raise DataError(source, i, "rejected", "is identical to 'chosen' (the pair carries no preference)",
                            "remove the row or fix the pair")
        if "margin" in row:
            _check_margin(row["margin"], source, i)


def _check_margin(value: Any, source: str, row: int) -> None:
    """A preference row's optional ``margin``: by how much chosen should out-score rejected (the reward loss)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(source, row, "margin", f"expected a finite number, got {_show(value)}",
                        "give every pair a numeric margin (how much better chosen is), or drop the column")


# ---------------------------------------------------------------------------------------------------- tokenising
def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


class Tokenizer:
    """Turns validated rows into token ids and loss masks for one tokenizer and DataConfig."""

    def __init__(self, tokenizer, cfg: DataConfig, source: str, where=None):
        self.tok = tokenizer
        self.cfg = cfg
        self.source = source
        self.where = where or (lambda i: (source, i))  # global row → (file, row in file), for error messages
        self.eos = tokenizer.eos_token_id
        self.max_prompt = cfg.max_prompt_length or (cfg.max_length - 1)
        self.stats = DataStats()

    def _error(self, row: int, field: str | None, problem: str, fix: str = "") -> DataError:
        name, local = self.where(row)
        return DataError(name, local, field, problem, fix)

    # prompts -------------------------------------------------------------------------------------------------
    def _as_chat(self, value, role: str):
        if isinstance(value, list):
            return value
        if self.cfg.chat_template == "always":
            return [{"role": role, "content": value}]
        return None

    def _need_template(self, row: int, field: str) -> None:
        if not _has_template(self.tok):
            raise self._error(row, field, "is a list of chat messages but the tokenizer has no chat "
                            "template", "use a tokenizer with a chat_template, or give the rows as plain text")

    def prompt_ids(self, prompt, row: int) -> list[int]:
        chat = self._as_chat(prompt, "user")
        if chat is None:
            return list(self.tok(prompt)["input_ids"])
        self._need_template(row, "prompt")
        if chat[-1]["role"] == "assistant":
            return _template_ids(self.tok, chat, continue_final_message=True)
        return _template_ids(self.tok, chat, add_generation_prompt=True)

    # completions ---------------------------------------------------------------------------------------------
    def prompt_completion(self, prompt, completion, row: int, field: str = "completion") -> Sample | None:
        chat_p = self._as_chat(prompt, "user")
        p_ids = self.prompt_ids(prompt, row)
        if chat_p is None:
            full = list(self.tok(prompt + completion)["input_ids"])
            if self.eos is not None and (not full or full[-1] != self.eos):
                full.append(self.eos)  # as TRL: non-chat completions end with EOS
        else:
            chat_c = self._as_chat(completion, "assistant")
            if chat_c is None:
                raise self._error(row, field, "prompt is chat messages but the completion is text")
            full = _template_ids(self.tok, chat_p + chat_c)
        start = _common_prefix(p_ids, full)
        mask = [False] * start + [True] * (len(full) - start)
        return self._fit(full, mask, start, row, field)

    def messages(self, messages, row: int) -> Sample | None:
        self._need_template(row, "messages")
        template = self.tok.chat_template if isinstance(self.tok.chat_template, str) else ""
        if _GENERATION_TAG.search(template):
            out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
        else:  # no {% generation %} markers: find each assistant turn by rendering the conversation up to it
            ids = _template_ids(self.tok, messages)
            mask = [False] * len(ids)
            for j, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = _common_prefix(_template_ids(self.tok, messages[:j], add_generation_prompt=True), ids) \
                    if j else 0
                upto = _common_prefix(_template_ids(self.tok, messages[: j + 1]), ids)
                for t in range(before, upto):
                    mask[t] = True
        if not any(mask[1:]):
            raise self._error(row, "messages", "no assistant tokens found after tokenisation",
                            "the chat template must render assistant turns (check it handles role 'assistant')")
        first = mask.index(True) if True in mask else len(mask)
        return self._fit(ids, mask, first, row, "messages")

    def text(self, text, row: int) -> Sample | None:
        ids = list(self.tok(text)["input_ids"])
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return self._fit(ids, [False] + [True] * (len(ids) - 1), 1, row, "text")

    def _fit(self, ids: list[int], mask: list[bool], prompt_len: int, row: int, field: str) -> Sample | None:
        if prompt_len > self.max_prompt:
            self.stats.skipped_long_prompt += 1
            return None
        if len(ids) > self.cfg.max_length:
            ids, mask = ids[: self.cfg.max_length], mask[: self.cfg.max_length]
            self.stats.truncated += 1
        mask = list(mask)
        mask[0] = False
        if not any(mask):
            raise self._error(row, field, "has no completion tokens after tokenisation",
                            "the completion is empty or the prompt fills max_length")
        return Sample(input_ids=ids, loss_mask=mask)

    # rows -> examples ----------------------------------------------------------------------------------------
    def example(self, row: dict, i: int, fmt: str) -> Example | None:
        if fmt == "messages":
            samples = [self.messages(row["messages"], i)]
        elif fmt == "prompt_completion":
            samples = [self.prompt_completion(row["prompt"], row["completion"], i)]
        elif fmt == "text":
            samples = [self.text(row["text"], i)]
        elif fmt == "preference":
            prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
            if prompt is None:  # implicit prompt: the shared leading messages (TRL's extract_prompt)
                from trl.data_utils import extract_prompt

                ex = extract_prompt({"chosen": chosen, "rejected": rejected})
                prompt, chosen, rejected = ex["prompt"], ex["chosen"], ex["rejected"]
                if not prompt:
                    raise self._error(i, "prompt", "is missing and chosen / rejected share no leading messages to "
                                      "use as one", "add a prompt column or start both with the prompt turns")
            samples = [self.prompt_completion(prompt, chosen, i, "chosen"),
                       self.prompt_completion(prompt, rejected, i, "rejected")]
            if "margin" in row:  # per pair, on both rows: batch.extras["margin"] (B,)
                for s in samples:
                    if s is not None:
                        s.fields["margin"] = float(row["margin"])
            if samples[0] is not None and samples[1] is not None and samples[0].input_ids == samples[1].input_ids:
                raise self._error(i, "rejected", "tokenises to the same ids as 'chosen' (after truncation to "
                                  f"data.max_length={self.cfg.max_length})", "the pair carries no preference: raise "
                                  "data.max_length if the completions differ further on, else fix or remove the row")
        else:
            raise ValueError(f"format {fmt!r} has no training examples")
        if any(s is None for s in samples):
            return None
        self.stats.examples += 1
        for s in samples:
            self.stats.tokens += len(s.input_ids)
            self.stats.loss_tokens += s.num_loss_tokens
        return Example(samples=samples, index=i)


def _rows_and_format(spec: str, cfg: DataConfig, split: str | None = None):
    rows, source = read_rows(spec, split or cfg.split, cfg.limit)
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows, rows.where(0)[0])
    for i, row in enumerate(rows):
        name, local = rows.where(i)
        validate_row(row, local, fmt, name)
    with_margin = [i for i, row in enumerate(rows) if "margin" in row] if fmt == "preference" else []
    if with_margin and len(with_margin) < len(rows):
        missing = next(i for i, row in enumerate(rows) if "margin" not in row)
        name, local = rows.where(missing)
        first, first_local = rows.where(with_margin[0])
        raise DataError(name, local, "margin", f"is missing, but {first} row {first_local} has one",
                        "give every pair a margin or none (a pair without one would silently use 0)")
    return rows, source, fmt


def load_examples(spec: str, tokenizer, cfg: DataConfig, progress: bool = True) -> tuple[list[Example], DataStats, str]:
    """Read, validate every row, then tokenise: (examples, stats, format). Errors name file, row and field."""
    rows, source, fmt = _rows_and_format(spec, cfg)
    if fmt == "prompt":
        raise DataError(source, None, None, "holds prompts only (no completions to train on)",
                        "use a loss that learns from rollouts, or data with completions / chosen+rejected")
    tk = Tokenizer(tokenizer, cfg, source, rows.where)
    tk.stats.rows = len(rows)
    iterator = enumerate(rows)
    if progress and len(rows) >= 2000:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(rows), desc=f"tokenising {os.path.basename(source)}")
    examples = [ex for i, row in iterator if (ex := tk.example(row, i, fmt)) is not None]
    if not examples:
        raise DataError(source, None, None, f"no usable rows ({tk.stats.summary()})",
                        "raise data.max_length / data.max_prompt_length or check the rows")
    return examples, tk.stats, fmt


def load_prompts(spec: str, tokenizer, cfg: DataConfig, limit: int | None = None) -> list[PromptRow]:
    """Prompt rows (+ every other column as reward fields) for generation: eval sets and rollout prompts."""
    rows, source = read_rows(spec, cfg.split, limit)
    for i, row in enumerate(rows):
        name, local = rows.where(i)
        validate_row(row, local, "prompt", name)
    tk = Tokenizer(tokenizer, cfg, source, rows.where)
    out = []
    for i, row in enumerate(rows):
        ids = tk.prompt_ids(row["prompt"], i)
        if len(ids) > tk.max_prompt:
            tk.stats.skipped_long_prompt += 1
            continue
        fields = {k: v for k, v in row.items() if k != "prompt"}
        text = row["prompt"] if isinstance(row["prompt"], str) else tokenizer.decode(ids)
        messages = row["prompt"] if isinstance(row["prompt"], list) else None
        out.append(PromptRow(prompt_ids=ids, prompt_text=text, fields=fields, index=i, prompt_messages=messages))
    if tk.stats.skipped_long_prompt:
        log.warning("%s: skipped %d prompts longer than max_prompt_length", source, tk.stats.skipped_long_prompt)
    if not out:
        raise DataError(source, None, None, "no usable prompts")
    return out
