"""Shared test helpers (import as `from helpers import ...`; tests/ is on sys.path under pytest)."""

import json
import os

import torch

from losses import LossContext


def ctx_for(mask: torch.Tensor, **kw) -> LossContext:
    """A LossContext whose counts are those of `mask` alone (one micro-batch = the whole optimizer batch)."""
    defaults = dict(num_tokens=float(mask.sum()), num_sequences=float(mask.shape[0]), num_micro_batches=1,
                    max_length=mask.shape[1])
    defaults.update(kw)
    return LossContext(**defaults)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def arith_rows(n, start=0):
    rows = []
    for i in range(start, start + n):
        a, b = i % 50, (i * 7) % 50
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "completion": [{"role": "assistant", "content": str(a + b)}]})
    return rows


def tiny_config(tmp_path, tiny_dir=None, **sections):
    """A RunConfig dict for a tiny, fast run in tmp_path."""
    os.makedirs(tmp_path, exist_ok=True)
    data_path = write_jsonl(os.path.join(tmp_path, "train.jsonl"), arith_rows(64))
    cfg = {
        "run_dir": str(os.path.join(tmp_path, "run")),
        "seed": 0,
        "model": {"name": tiny_dir or "tiny", "tiny": {"hidden_size": 64, "num_heads": 1, "num_layers": 1,
                                                      "intermediate_size": 128}},
        "data": {"train": data_path, "max_length": 48},
        "loss": {"name": "sft"},
        "train": {"steps": 4, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "save_every": 0},
        "log": {"progress": False, "tensorboard": False, "plots": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def load_example(name: str):
    """examples/NAME.py imported as a module (the example scripts are not a package)."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
