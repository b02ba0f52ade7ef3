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
def _drop_run_log_handlers():
    """Each run adds a train.log FileHandler to the "align" logger; a test that moves its run directory, followed by
    vLLM's logging set-up (which closes every handler, so the next record reopens the file), made a later test fail
    on a missing path. Remove the handlers a test added when it ends."""
    import logging

    logger = logging.getLogger("align")
    before = list(logger.handlers)
    yield
    for h in [h for h in logger.handlers if h not in before and isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()


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
