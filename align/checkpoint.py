"""Checkpoints that are either complete or absent.

Layout of ``RUN_DIR/checkpoints/step-00000100/``::

    model/               Hugging Face folder (save_pretrained, safetensors) + tokenizer
    optimizer.pt         optimizer and scheduler state (loaded with torch.load(weights_only=True))
    trainer_state.json   step, data position, RNG states, counters
    COMPLETE             written last

Every checkpoint is written into a temporary folder, flushed to disk, then renamed into place (atomic on one file
system), and only then does ``RUN_DIR/checkpoints/latest`` (itself replaced atomically) point at it. A crash or
``kill -9`` at any moment leaves the previous checkpoint as the latest; a full disk raises an error that says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

CKPT = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT)


def _commit(tmp: str, final: str, name: str) -> None:
    """Mark ``tmp`` complete, flush it to disk and rename it to ``final`` (replacing an older one)."""
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(name)
    _fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


class _OneProcess:
    is_main = True
    world_size = 1

    def barrier(self) -> None:
        pass


def save_checkpoint(run_dir: str, step: int, save_model, optimizer_state: dict, trainer_state: dict,
                    keep: int = 2, *, save_state=None, comm=None) -> str:
    """Write checkpoint ``step`` atomically. ``save_model(folder)`` writes the Hugging Face model there.

    Several processes (``comm``: ``is_main``, ``world_size``, ``barrier()``, e.g. a DeepSpeed backend): every rank
    calls this; rank 0 makes the temporary folder, every rank runs ``save_model`` (ZeRO-3 gathers collectively) and
    ``save_state(folder)`` (its own shards), and only after a barrier does rank 0 write the rest, rename the folder
    and switch ``latest`` — so ``latest`` never names a checkpoint some rank has not finished. A final barrier keeps
    ranks from running ahead of the rename."""
    comm = comm or _OneProcess()
    root = checkpoint_dir(run_dir)
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    # one name all ranks agree on when several write; a pid otherwise (concurrent writers of one run dir)
    tmp = os.path.join(root, f".tmp-{name}-" + ("dist" if comm.world_size > 1 else str(os.getpid())))
    previous = latest_checkpoint(run_dir)
    try:
        if comm.is_main:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        comm.barrier()
        save_model(os.path.join(tmp, "model"))
        if save_state is not None:
            save_state(tmp)
        comm.barrier()
        if comm.is_main:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(trainer_state, f)
            _commit(tmp, final, name)
            atomic_write_text(os.path.join(root, LATEST), name)
    except BaseException as e:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {name} ({e.strerror or e}); {kept}") from e
        raise
    if comm.is_main:
        _prune(root, keep)
    comm.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and is_complete(os.path.join(root, d)))
    for d in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    for d in os.listdir(root):  # temporary folders of crashed writers
        if d.startswith(".tmp-") and not d.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint: the one ``latest`` names, else the newest complete folder."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if name and is_complete(path):
            return path
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and is_complete(os.path.join(root, d)))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(trainer_state, optimizer_state) of a complete checkpoint."""
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    try:
        opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}/optimizer.pt cannot be loaded: {e}") from e
    return state, opt


def save_final(run_dir: str, save_model, name: str = "final", *, comm=None) -> str:
    """The finished model, written atomically to ``RUN_DIR/final`` (``comm``: as in :func:`save_checkpoint`)."""
    comm = comm or _OneProcess()
    final = os.path.join(run_dir, name)
    tmp = f"{final}.tmp-" + ("dist" if comm.world_size > 1 else str(os.getpid()))
    if comm.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()
    try:
        save_model(tmp)
        comm.barrier()
        if comm.is_main:
            _commit(tmp, final, name)
    except BaseException as e:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write the final model to {final} ({e.strerror or e})") from e
        raise
    comm.barrier()
    return final
