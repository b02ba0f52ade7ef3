"""Reference log-probs computed once before training and cached on disk (LOSSES.md §2.4).

One pass of the frozen reference policy over every example of a fixed dataset, with the trainer's own forward (same
tokenisation, truncation, masks, chunked fp32 head), stores the per-token log-probs of each sample's loss tokens. The
trainer then fills ``batch.extras["ref_logprobs"]`` from memory, so any loss that declares ``ref_logprobs`` gets the
same (B, T) tensor as with a reference model in memory, and the reference model is not kept.

File layout (safetensors, one file per key): ``values`` (N,) float32 — the loss tokens of all samples, concatenated;
``offsets`` (S + 1,) int64 — sample s owns ``values[offsets[s]:offsets[s + 1]]``; ``rows`` / ``slots`` (S,) int64 —
the dataset row of sample s and its place in its example (0 = chosen, 1 = rejected for pairs). The file name is a
hash of the reference weights, the tokenised data and the settings that change the numbers, so a rerun (or another
run on the same model and data) reuses it and any change recomputes it.

Hand-written because TRL's ``precompute_ref_log_probs`` stores only per-sequence sums inside its own dataset pipeline,
and losses here may need per-token values.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from losses import Batch
from rollouts.types import Example

from .collate import collate

log = logging.getLogger("align")

CACHE_VERSION = 1
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed in full
_BLOCK = 1 << 20
_BLOCKS = 32  # larger files: size + header + this many evenly spaced 1 MiB blocks


class ReferenceCacheError(RuntimeError):
    pass


@dataclass
class RefLogprobs:
    """Per-token reference log-probs of the loss tokens of every sample, looked up by (dataset row, slot)."""

    values: torch.Tensor  # (N,) float32
    offsets: torch.Tensor  # (S + 1,) int64
    rows: torch.Tensor  # (S,) int64 dataset row of each sample
    slots: torch.Tensor  # (S,) int64 place of the sample in its example
    path: str | None = None

    def __post_init__(self):
        self._where = {(int(r), int(s)): i for i, (r, s) in enumerate(zip(self.rows.tolist(), self.slots.tolist()))}

    def __len__(self) -> int:
        return len(self._where)

    def fill(self, batch: Batch, units: list[list[int]]) -> torch.Tensor:
        """(B, T) reference log-probs for a collated batch (zero off the loss mask), as the on-the-fly path gives."""
        out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
        index = batch.extras["index"].tolist()
        mask = batch.loss_mask.cpu()
        for rows in units:
            for slot, r in enumerate(rows):
                i = self._where.get((index[r], slot))
                if i is None:
                    raise ReferenceCacheError(f"no precomputed reference log-probs for dataset row {index[r]} (sample "
                                              f"{slot}) in {self.path}; delete the file to recompute it")
                vals = self.values[self.offsets[i]: self.offsets[i + 1]]
                if int(mask[r].sum()) != len(vals):
                    raise ReferenceCacheError(
                        f"{self.path}: dataset row {index[r]} (sample {slot}) has {int(mask[r].sum())} loss tokens "
                        f"but {len(vals)} cached values; the cache does not match the data; delete it to recompute")
                out[r, mask[r]] = vals
        return out.to(batch.loss_mask.device)

    def save(self, path: str, meta: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"values": self.values.contiguous(), "offsets": self.offsets, "rows": self.rows,
                   "slots": self.slots}, tmp, metadata={"align": json.dumps(meta)})
        os.replace(tmp, path)  # readers never see a half-written cache
        self.path = path

    @classmethod
    def load(cls, path: str, key: str) -> "RefLogprobs":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("align", "{}"))
            if meta.get("key") != key:
                raise ReferenceCacheError(f"{path} was written for another key; delete it")
            t = {name: f.get_tensor(name) for name in ("values", "offsets", "rows", "slots")}
        return cls(**t, path=path)


# ------------------------------------------------------------------------------------------------------- hashing
def _hash_file(h, path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(_BLOCK * 8), b""):
                h.update(block)
            return
        for k in range(_BLOCKS + 1):  # the first block holds a safetensors header (names, shapes, offsets)
            f.seek(min(k * (size - _BLOCK) // _BLOCKS, size - _BLOCK))
            h.update(f.read(_BLOCK))


def weights_fingerprint(path: str) -> str | None:
    """A hash of a model folder's config and weight files (None when ``path`` is neither a folder nor a cached hub
    snapshot); for a LoRA adapter folder also its adapter config and its base model's fingerprint. Files ≤ 64 MiB are hashed in full; larger ones by size, header and 32 evenly spaced 1 MiB blocks —
    training changes every tensor, so any fine-tuned copy differs in every block."""
    folder = path if os.path.isdir(path) else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(path, local_files_only=True)
        except Exception:
            return None
    files = sorted({f for pattern in _WEIGHT_FILES for f in glob.glob(os.path.join(folder, pattern))})
    if not any(not f.endswith("config.json") for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        _hash_file(h, f)
    from .lora import ADAPTER_CONFIG, adapter_base, is_adapter_dir

    if is_adapter_dir(folder):  # a LoRA adapter (a LoRA stage's final/): the model is its base + this adapter
        _hash_file(h, os.path.join(folder, ADAPTER_CONFIG))
        base = weights_fingerprint(adapter_base(folder))
        if base is None:
            return None
        h.update(f"base:{base}".encode())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fallback when the weights are not files we can read: a hash of every tensor's name, shape and a strided sample
    of its values (at most 4096 per tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(examples: list[Example]) -> str:
    """A hash of the tokenised examples: dataset rows, token ids and loss masks (so truncation is included)."""
    h = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: e.index):
        h.update(f"row {ex.index} {len(ex.samples)}".encode())
        for s in ex.samples:
            h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
            h.update(np.asarray(s.loss_mask, dtype=np.bool_).tobytes())
    return h.hexdigest()


def cache_key(weights: str, examples: list[Example], settings: dict) -> str:
    parts = {"version": CACHE_VERSION, "weights": weights, "data": data_fingerprint(examples), **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- the one pass
LogprobsFn = Callable[[torch.nn.Module, Batch, list[list[int]]], torch.Tensor]


@torch.no_grad()
def compute(model: torch.nn.Module, examples: list[Example], logprobs_fn: LogprobsFn, pad_id: int,
            device: torch.device, chunk: int = 32, progress: bool = True, desc: str = "reference log-probs") -> RefLogprobs:
    """One pass of ``model`` over ``examples`` with ``logprobs_fn(model, batch, units) -> (B, T)`` (the trainer's own
    no-grad forward), longest examples first so chunks group similar lengths; the progress bar moves once a chunk."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    values, lengths, rows, slots = [], [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="ex", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), chunk):
            part = [examples[i] for i in order[start: start + chunk]]
            batch, units = collate(part, pad_id)
            batch = batch.to(device)
            lp = logprobs_fn(model, batch, units).float().cpu()
            mask = batch.loss_mask.cpu()
            for ex, unit in zip(part, units):
                for slot, r in enumerate(unit):
                    v = lp[r][mask[r]]
                    values.append(v)
                    lengths.append(len(v))
                    rows.append(ex.index)
                    slots.append(slot)
            if bar is not None:
                bar.update(len(part))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    flat = torch.cat(values) if values else torch.zeros(0)
    if not torch.isfinite(flat).all():
        raise ReferenceCacheError("the reference model produced non-finite log-probs; check its weights and dtype")
    return RefLogprobs(values=flat, offsets=offsets, rows=torch.tensor(rows, dtype=torch.int64),
                       slots=torch.tensor(slots, dtype=torch.int64))


def _load(path: str, key: str, name: str) -> RefLogprobs | None:
    if not os.path.isfile(path):
        return None
    try:
        ref = RefLogprobs.load(path, key)
    except Exception as e:  # a damaged file: recompute it
        log.warning("reference cache %s unreadable (%s); recomputing", path, e)
        return None
    log.info("reference log-probs (%s): reusing %s (%d samples)", name, path, len(ref))
    return ref


def cached(examples: list[Example], *, weights: str | None, get_model: Callable[[], torch.nn.Module],
           logprobs_fn: LogprobsFn, settings: dict, cache_dir: str, pad_id: int, device: torch.device,
           progress: bool = True, name: str = "train", all_agree: Callable[[bool], bool] = lambda ok: ok,
           is_main: bool = True) -> RefLogprobs:
    """The reference log-probs of ``examples``: from ``cache_dir`` when a file with this key exists, else computed
    with ``get_model()`` (called only then) and saved there.

    Several processes: ``all_agree(hit)`` is True only when every rank found the file, so either all read it or all
    run the pass (under ZeRO-3 its forwards are collective); every rank computes the same values and rank 0 writes."""
    if weights is None:
        weights = "model:" + model_fingerprint(get_model())
    key = cache_key(weights, examples, settings)
    path = os.path.join(cache_dir, f"ref-{name}-{key[:24]}.safetensors")
    ref = _load(path, key, name)
    if all_agree(ref is not None):
        return ref
    ref = compute(get_model(), examples, logprobs_fn, pad_id, device, progress=progress and is_main,
                  desc=f"reference log-probs ({name})")
    if is_main:
        ref.save(path, {"key": key, "examples": len(examples), "tokens": int(ref.values.numel()), **settings})
        log.info("reference log-probs (%s): %d samples, %d tokens, saved to %s", name, len(ref), ref.values.numel(),
                 path)
    return ref
