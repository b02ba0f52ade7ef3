"""What one rank holds for parameters, gradients and optimizer state, in bytes, under any ZeRO stage.

Counted from the tensors themselves, each storage once (views of a flat buffer count as the buffer):

- ``params``: the model's parameters as this rank stores them (ZeRO-3: its shard, ``param.ds_tensor``).
- ``optimizer_states``: the optimizer's state tensors (AdamW's two moments and step counters).
- ``master_weights``: parameters the optimizer updates that are separate copies of the model's (fp32 master
  partitions under ZeRO-1/2/3 or mixed precision); zero when the optimizer updates the model's tensors in place.
- ``gradients``: parameter ``.grad`` tensors and every other tensor DeepSpeed's ZeRO optimizer object holds
  (gradient partitions, reduction buckets).

Hand-written because DeepSpeed reports memory only as allocator totals (``see_memory_usage``), which on CPU are
process-wide and cannot be split into these parts.
"""

from __future__ import annotations

import torch


# Where DeepSpeed keeps the fp32 copies its optimizer updates: ZeRO-1/2, ZeRO-3, the bf16 optimizer (stage 0).
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


class _Ledger:
    def __init__(self):
        self.seen: set[int] = set()

    def add(self, t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or storage.nbytes() == 0 or key in self.seen:
            return 0
        self.seen.add(key)
        return storage.nbytes()


def _walk(obj, ledger: _Ledger, visited: set[int], depth: int = 0) -> int:
    """Bytes of tensors reachable from a DeepSpeed object (attributes, lists, dicts), each storage once."""
    if depth > 6 or id(obj) in visited:
        return 0
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return ledger.add(obj) + (ledger.add(obj.grad) if obj.is_leaf and obj.grad is not None else 0)
    if isinstance(obj, dict):
        return sum(_walk(v, ledger, visited, depth + 1) for v in list(obj.values()))
    if isinstance(obj, (list, tuple, set)):
        return sum(_walk(v, ledger, visited, depth + 1) for v in list(obj))
    if type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        return sum(_walk(v, ledger, visited, depth + 1) for v in list(vars(obj).values()))
    return 0


def engine_bytes(engine, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{params, gradients, optimizer_states, master_weights, total} for this rank of a DeepSpeed engine whose base
    (client) optimizer is ``optimizer``."""
    ledger = _Ledger()
    params = sum(ledger.add(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data)
                 for p in engine.module.parameters())
    states = sum(ledger.add(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    masters = sum(ledger.add(p.data) for g in optimizer.param_groups for p in g["params"])
    for name in MASTER_ATTRS:  # DeepSpeed's fp32 partitions the optimizer steps on (not always in param_groups)
        masters += sum(ledger.add(t) for t in getattr(engine.optimizer, name, None) or [])
    grads = sum(ledger.add(p.grad) for p in engine.module.parameters())
    grads += sum(ledger.add(p.grad) for g in optimizer.param_groups for p in g["params"])
    if engine.optimizer is not optimizer:  # a ZeRO / mixed-precision wrapper: its remaining tensors are grad buffers
        grads += _walk(engine.optimizer, ledger, set())
    out = {"params": params, "gradients": grads, "optimizer_states": states, "master_weights": masters}
    out["total"] = sum(out.values())
    return out
