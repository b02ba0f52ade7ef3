import os

# Default OpenMP threading makes training 30-60x slower on a busy 2-core machine; set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import pytest
import torch

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "examples", "data", "arith")


@pytest.fixture(autouse=True)
def _close_run_logs():
    """Each Trainer adds a FileHandler for RUN_DIR/train.log to the `align` logger; drop them after every test. Left
    attached, a handler whose run directory a test moved or deleted fails the next log call of a later test once
    anything has closed the handlers (logging.config.dictConfig closes them all, and importing vllm calls it)."""
    yield
    import logging

    root = logging.getLogger("align")
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama model + character tokenizer (built offline once per test session)."""
    from align.tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from align.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture()
def tiny_model(tiny_dir):
    from align.config import ModelConfig
    from align.models import load_model

    return load_model(tiny_dir, ModelConfig(name=tiny_dir), torch.device("cpu"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
