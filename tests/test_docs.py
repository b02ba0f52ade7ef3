"""The documentation names only things that exist.

For README.md and every page under docs/:
* every `align ...` command (in a fenced block or inline code) names a real subcommand, and each of its `--flags`
  appears in that subcommand's `--help`; its `key.sub=value` overrides name real config keys;
* every dotted config key written in inline code (`train.lr`, `rollout.select`, ...) and every key of a YAML block
  that is a run config exists in the config dataclasses, and a loss's options exist on that loss;
* every `examples/...` and `benchmarks/...` path exists, and so does every source path (`align/...`, `losses/...`,
  `rollouts/...`) the docs point readers to.

Everything that knows where align keeps its parser, its config classes or its loss registry is in the small block
"how to reach align" right below; the rest of this file only reads Markdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import re
import shlex
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- how to reach align (the only
# place that names align's internals; adjust here when modules move)
def _align_main():
    """The `align` console script's function, found through pyproject.toml's [project.scripts] entry."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    target = re.search(r'^align\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert target, "pyproject.toml: no `align = \"module:function\"` under [project.scripts]"
    return getattr(importlib.import_module(target.group(1)), target.group(2))


def _run_config_class():
    """The dataclass a run config (one stage) is loaded into by `align train`."""
    from align.config import RunConfig

    return RunConfig


def _is_loss_config(cls) -> bool:
    """Whether ``cls`` is the config class of the `loss:` section (its extra keys are the loss's options)."""
    return cls.__name__ == "LossConfig"


def _loss_options() -> dict[str, set[str]]:
    """Registered loss name -> the names of its options."""
    import losses

    return {name: {f.name for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(cls.Options) else set()
            for name, cls in losses.registered().items()}


# ------------------------------------------------------------------------------------------------- reading the docs
def doc_pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SECTIONS = ("model", "data", "loss", "train", "eval", "reference", "engine", "rollout", "backend", "log", "peft")
DOTTED = re.compile(r"^(%s)\.([A-Za-z_][\w.]*)$" % "|".join(SECTIONS))


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _inline_codes(text: str) -> list[str]:
    return INLINE.findall(_prose(text))


def _commands(text: str) -> list[list[str]]:
    """Every align invocation: lines of bash blocks and inline code, as the arguments after `align`."""
    lines = []
    for lang, body in _blocks(text):
        if lang in ("bash", "sh", ""):
            lines += body.replace("\\\n", " ").splitlines()
    lines += [c for c in _inline_codes(text) if c.startswith("align ")]
    found = []
    for line in lines:
        for part in re.split(r"&&|;", line.split(" #")[0]):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # OMP_NUM_THREADS=1 align ...
                words = words[1:]
            args = None
            if words[:1] == ["align"]:
                args = words[1:]
            elif "align.cli" in words:  # python -m align.cli / torchrun -m align.cli / deepspeed --module align.cli
                args = words[words.index("align.cli") + 1:]
            if args:
                found.append(args)
    return found


# ------------------------------------------------------------------------------------------------------ the checks
@functools.lru_cache(maxsize=None)
def _help(prefix: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            _align_main()([*prefix, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


def _subcommands(help_text: str) -> set[str]:
    usage = help_text.split("\n\n")[0]
    choices = re.findall(r"\{([\w,-]+)\}", usage)
    return set(choices[-1].split(",")) if choices else set()


def check_command(args: list[str]) -> list[str]:
    """Problems with one `align ARGS...` invocation (subcommands, --flags, key=value overrides)."""
    prefix: list[str] = []
    rest = list(args)
    while rest and not rest[0].startswith("-"):
        subs = _subcommands(_help(tuple(prefix)))
        if not subs:
            break
        if rest[0] not in subs:
            return [f"`align {' '.join(args)}`: no subcommand {rest[0]!r} after `align {' '.join(prefix)}` "
                    f"(there are: {', '.join(sorted(subs))})"]
        prefix.append(rest.pop(0))
    if not prefix:
        return [f"`align {' '.join(args)}`: no subcommand"]
    problems = []
    help_text = _help(tuple(prefix))
    custom_loss = any(re.match(r"loss(\.name)?=.*[:/]", a) for a in rest)
    for word in rest:
        if word.startswith("--"):
            flag = word.split("=")[0]
            if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), help_text):
                problems.append(f"`align {' '.join(args)}`: `align {' '.join(prefix)}` has no option {flag}")
        elif "=" in word and DOTTED.match(word.split("=")[0]) and not (custom_loss and word.startswith("loss.")):
            problems += check_dotted_key(word.split("=")[0])
    return problems


def _fields(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp):
    """The dataclass a field's type holds (directly, optional, or as list items), and whether it is a list."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return tp, False
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _dataclass_in(arg)
            if found[0] is not None:
                return found
    if origin is list:
        inner = _dataclass_in(typing.get_args(tp)[0])[0]
        return inner, True
    return None, False


def check_dotted_key(key: str) -> list[str]:
    """`a.b.c` → problems if it names no config field (a loss option counts for `loss.X`)."""
    parts = key.split(".")
    cls = _run_config_class()
    for i, part in enumerate(parts):
        if _is_loss_config(cls) and part not in _fields(cls):  # loss.X: an option of some loss
            if not any(part in opts for opts in _loss_options().values()):
                return [f"`{key}`: no loss has an option {part!r}"]
            return []
        hints = _fields(cls)
        if part not in hints:
            return [f"`{key}`: {'.'.join(parts[:i]) or 'the config'} has no key {part!r}"]
        inner, _ = _dataclass_in(hints[part])
        if inner is None:
            return []  # a leaf (or a free-form mapping such as engine.options)
        cls = inner
    return []


def check_mapping(cls, data, where: str) -> list[str]:
    """Problems with a YAML mapping loaded into dataclass ``cls`` (unknown keys, loss options)."""
    if not isinstance(data, dict):
        return []
    hook = getattr(cls, "__from_dict__", None)
    if hook is not None:  # the class's own shorthand (`loss: dpo`, extra keys as a loss's or reward's options)
        data = hook(dict(data), where)
    hints = _fields(cls)
    problems = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            problems.append(f"unknown config key `{path}` (valid: {', '.join(hints)})")
            continue
        inner, is_list = _dataclass_in(hints[key])
        if inner is not None:
            for item in (value if is_list and isinstance(value, list) else [value]):
                problems += check_mapping(inner, item, path)
    if _is_loss_config(cls):
        options = _loss_options().get(data.get("name"))
        if options is not None:  # a registered loss: its options must exist (your own loss is not checked)
            problems += [f"loss `{data['name']}` has no option `{k}` ({where})" for k in data["options"]
                         if k not in options]
    return problems


def check_yaml_block(body: str) -> list[str]:
    """A YAML block that is (part of) a run config or a pipeline."""
    chunks = re.split(r"\n(?=[\w-]+\s*:)", body.strip())
    keys = [c.split(":")[0].strip() for c in chunks]
    if len(set(keys)) < len(keys):  # alternatives under the same key ("loss: ...  # one", "loss: ...  # two")
        return [p for chunk in chunks for p in check_yaml_block(chunk)]
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError as e:
        return [f"YAML block does not parse: {e}"]
    if not isinstance(data, dict):
        return []
    if not any(k in data for k in (*SECTIONS, "stages", "run_dir")):
        return []  # not a run config (a DeepSpeed JSON, a samples line, ...)
    run = _run_config_class()
    stages = data.pop("stages", None) or []
    problems = check_mapping(run, data, "")
    for i, stage in enumerate(stages):
        stage = dict(stage)
        stage.pop("name", None)
        problems += check_mapping(run, stage, f"stages[{i}]")
    return problems


PATH = re.compile(r"(?<![\w/.-])((?:examples|benchmarks|align|losses|rollouts)/[\w./-]*[\w/])")
GENERATED = ("runs/", "examples/data/arith/", "benchmarks/RESULTS.md")  # written by commands the docs show


def _paths(text: str) -> set[str]:
    out = set()
    for code in _inline_codes(text) + [b for _, b in _blocks(text)] + re.findall(r"\]\(\.{0,2}/?([^)#]+)", text):
        for m in PATH.finditer(code):
            out.add(m.group(1))
    return out


def _path_exists(path: str) -> bool:
    path = path.split("::")[0].rstrip("/.")
    if "*" in path or "{" in path:
        return True
    return (ROOT / path).exists() or (ROOT / path).with_suffix(".py").exists()


# -------------------------------------------------------------------------------------------------------- the tests
PAGES = doc_pages()
IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]


def test_the_docs_exist():
    names = {p.name for p in PAGES}
    for page in ("config.md", "data.md", "losses.md", "rollouts.md", "rl.md", "best_of_n.md", "pipelines.md",
                 "lora.md", "distributed.md", "reliability.md", "benchmarks.md", "writing_a_loss.md", "README.md"):
        assert page in names, f"docs/{page} is missing"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300, "README.md is over 300 lines: move the detail into docs/"
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name})" in (ROOT / "docs" / "README.md").read_text(encoding="utf-8"), \
                f"docs/README.md does not list {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_align_commands_exist(page):
    text = page.read_text(encoding="utf-8")
    problems = [p for args in _commands(text) for p in check_command(args)]
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_config_keys_exist(page):
    text = page.read_text(encoding="utf-8")
    problems = []
    for code in _inline_codes(text):
        key = code.split("=")[0].split(":")[0].strip()
        if DOTTED.match(key):
            problems += check_dotted_key(key)
    for lang, body in _blocks(text):
        if lang == "yaml":
            problems += check_yaml_block(body)
    for code in _inline_codes(text):  # inline YAML such as `rollout: {n: N, select: best}`
        if re.match(r"^(%s|stages):\s" % "|".join(SECTIONS), code):
            problems += check_yaml_block(code)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = sorted(p for p in _paths(text) if not p.startswith(GENERATED) and not _path_exists(p))
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def _losses_sections() -> set[str]:
    text = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.?\s", text, re.M))


def test_every_loss_is_in_the_math_page():
    """docs/losses.md covers every registered loss (by its config name, in code font)."""
    text = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8")
    missing = sorted(name for name in _loss_options() if f"`{name}`" not in text)
    assert not missing, f"docs/losses.md does not describe the losses {missing}"


def test_sections_cited_from_code_exist():
    """Every `docs/losses.md §N` (or the older `LOSSES.md §N`) cited in the code names a section of docs/losses.md."""
    sections = _losses_sections()
    assert {"0.1", "0.2", "1", "2.1", "6.3", "7.4", "8", "10"} <= sections, sorted(sections)
    cited = set()
    for folder in ("align", "losses", "rollouts", "benchmarks", "examples", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"(?:docs/losses|LOSSES)\.md\s*§\s*(\d+(?:\.\d+)*)", path.read_text(encoding="utf-8")):
                cited.add((m.group(1), path.relative_to(ROOT).as_posix()))
    assert cited, "no code cites docs/losses.md: the pattern above is out of date"
    missing = sorted(f"§{n} ({where})" for n, where in cited if n not in sections)
    assert not missing, f"cited but not in docs/losses.md: {missing}"


def test_the_checks_catch_mistakes():
    """Each check, fed a broken line, reports it (so a passing run above means something)."""
    assert check_command(["trian", "examples/quickstart.yaml"])
    assert check_command(["eval", "runs/x", "--reff", "models/base"])
    assert check_command(["train", "examples/quickstart.yaml", "train.lrr=1e-4"])
    assert not check_command(["train", "examples/quickstart.yaml", "train.lr=1e-4", "loss=dft"])
    assert check_dotted_key("rollout.selectt") and check_dotted_key("loss.no_such_option")
    assert not check_dotted_key("engine.options.kv_cache_memory_bytes") and not check_dotted_key("loss.kl_weight")
    assert check_yaml_block("loss: {name: dpo, betta: 0.1}")
    assert check_yaml_block("train: {steps: 10, lrr: 1.0}")
    assert check_yaml_block("stages:\n  - {name: a, train: {stepz: 1}}")
    assert not check_yaml_block("loss: {name: my_pkg.m:Loss, alpha: 0.5}")  # your own loss: options not checked
    assert not _path_exists("examples/no_such_file.yaml") and _path_exists("examples/quickstart.yaml")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
