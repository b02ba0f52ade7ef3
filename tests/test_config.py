"""Config loading: typed sections, a.b=c overrides, and errors that name the key before any model is loaded."""

import pytest
import yaml

from align.config import RunConfig, load_config
from align.configio import ConfigError


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"data": {"train": "examples/data/arith/train.jsonl"}}


def test_loads_and_overrides(tmp_path):
    pipe = load_config(write(tmp_path, {**BASE, "loss": "dft", "train": {"lr": 1e-4}}),
                       ["train.lr=3e-4", "loss.aggregation=seq_mean_token_mean", "model.tiny.num_layers=3"])
    cfg = pipe.stages[0].config
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 3e-4 and cfg.loss.name == "dft"
    assert cfg.loss.options == {"aggregation": "seq_mean_token_mean"}
    assert cfg.model.tiny.num_layers == 3


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {lr: 1e-5}\n")  # YAML 1.1 reads 1e-5 as a string
    assert load_config(str(path)).stages[0].config.train.lr == 1e-5


@pytest.mark.parametrize("data, match", [
    ({"trian": {"lr": 1}}, "unknown key 'trian'; did you mean 'train'"),
    ({"train": {"learning_rate": 1e-4}}, "unknown key 'train.learning_rate'"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1"),
    ({"train": {"schedule": "cosin"}}, "did you mean 'cosine'"),
    ({"loss": {"name": "sfft"}}, "unknown loss 'sfft'; did you mean 'sft'"),
    ({"loss": {"name": "dft", "agregation": "token_mean"}}, "unknown option 'loss.agregation' for loss 'dft'; did you mean 'aggregation'"),
    ({"loss": {"name": "sft", "aggregation": "mean"}}, "loss.aggregation: 'mean' is not one of"),
    ({"model": {"dtype": "fp32"}}, "model.dtype: 'fp32' is not one of"),
    ({"log": {"progress": "yes"}}, "log.progress: expected true or false"),
])
def test_bad_config_names_the_key(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, {**BASE, **data}))


def test_missing_train_data(tmp_path):
    with pytest.raises(ConfigError, match="data.train is required"):
        load_config(write(tmp_path, {"loss": "sft"}))


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(write(tmp_path, BASE), ["train.lr"])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_stages_merge_over_the_top_level(tmp_path):
    data = {**BASE, "train": {"lr": 1e-3, "steps": 5}, "stages": [
        {"name": "sft", "loss": "sft"},
        {"name": "dft", "loss": "dft", "train": {"lr": 1e-4}},
    ]}
    pipe = load_config(write(tmp_path, data))
    assert [s.name for s in pipe.stages] == ["sft", "dft"]
    assert pipe.stages[0].config.train.lr == 1e-3 and pipe.stages[1].config.train.lr == 1e-4
    assert pipe.stages[1].config.train.steps == 5


@pytest.mark.parametrize("stages, match", [
    ([{"loss": "sft"}], "every stage is a mapping with a `name`"),
    ([{"name": "a"}, {"name": "a"}], "must be unique"),
    ([{"name": "a"}, {"name": "b", "model": {"name": "@stage:c"}}], "'@stage:c' names no earlier stage"),
    ([{"name": "a", "run_dir": "x"}], "set `run_dir` once"),
    ([{"name": "a", "loss": {"name": "dft", "betaa": 1}}], r"unknown option 'stages\[0\].loss.betaa'"),
])
def test_bad_stages(tmp_path, stages, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, {**BASE, "stages": stages}))
