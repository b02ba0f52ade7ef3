"""Processes: who this one is, how many there are, and the few agreements the loop needs between them.

Data parallelism rule: every rank must make the same collective calls in the same order. Under ZeRO-3 every module
call gathers that module's parameters (a collective), so ranks must also run the same number of forwards and LM-head
chunks even when their shards differ in size. The helpers here make those counts agree: :func:`pad_plan` (micro-
batches) and :func:`agreed_chunks` (LM-head chunks). Launchers: ``torchrun`` or ``deepspeed`` set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python`` run is one process.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass, field

import torch

from .models import resolve_device

log = logging.getLogger("align")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ds_config: dict | None = None  # the DeepSpeed config (backend deepspeed), built once from ours
    zero3: bool = False  # parameters are sharded: models load straight into shards (zero.Init)
    hf_ds_config: object = None  # kept alive: transformers loads models sharded and generate() syncs ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def configure(self, cfg, model_path: str) -> None:
        """DeepSpeed only: build the DeepSpeed config (``align/dsconfig.py``) before the model loads; under ZeRO-3
        register it with transformers so ``from_pretrained`` loads straight into shards (``zero.Init``) and
        ``generate`` keeps ranks in step."""
        if cfg.backend.name != "deepspeed":
            return
        from . import dsconfig

        self.ds_config = dsconfig.build(cfg, self.world_size, model_path)
        self.zero3 = cfg.backend.zero_stage == 3
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(cfg) -> Dist:
    """Start (or join) the process group for ``cfg.backend`` and say which device this rank uses."""
    b = cfg.backend
    if b.name == "torch":
        return Dist(device=resolve_device(b.device))
    import deepspeed

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)  # a plain `python` run: a group of one
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if rank != 0:
        logging.getLogger("align").setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    # DeepSpeed 0.19 calls torch collectives that torch 2.13 marks deprecated, once per call: not ours to act on
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    cuda = torch.cuda.is_available() and b.device in ("auto", "cuda")
    device = torch.device(f"cuda:{local}") if cuda else resolve_device(b.device if b.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        global _started
        _started = True
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


_started = False  # True when setup() started the process group (not when a caller or vLLM did)


def shutdown(ok: bool) -> None:
    """End this process's part of the group before it exits: after a successful command every rank meets at a barrier
    (no rank tears down while another still talks to it), then the group is destroyed. Without this a rank that
    reaches the interpreter's exit first can abort the launcher's other rank (SIGABRT in gloo's threads)."""
    global _started
    if not (_started and torch.distributed.is_initialized()):
        return
    _started = False
    if ok:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _all_reduce(values: list[float], op, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, torch.distributed.ReduceOp.SUM, device)


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, torch.distributed.ReduceOp.MAX, device)


def agreed_chunks(loss_mask: torch.Tensor, chunk_tokens: int, device: torch.device) -> int:
    """The number of LM-head chunks every rank makes for this micro-batch: enough for the rank with the most loss
    tokens (``align.head.token_logprobs`` predicts ``loss_mask[:, 1:]``)."""
    n = float(loss_mask[:, 1:].sum())
    return int(-(-all_reduce_max([n], device)[0] // chunk_tokens))


def pad_plan(plan: list[list[int]], backend, filler: list[int] | None = None) -> tuple[list[list[int]], int]:
    """``plan`` extended to the longest plan of any rank, and how many of its micro-batches are real.

    The extra micro-batches repeat ``filler`` rows (default: this rank's first micro-batch, else row 0); the trainer
    runs them with weight 0, so every rank makes the same forward/backward calls (ZeRO-2/3 reduce gradients and ZeRO-3
    gathers parameters during them) and the extra ones change nothing."""
    n_real = len(plan)
    if backend.world_size == 1:
        return plan, n_real
    target = int(backend.all_reduce_max([float(n_real)])[0])
    pad = filler if filler is not None else (plan[0] if plan else [0])
    return plan + [pad] * (target - n_real), n_real


def reduce_metrics(sums: dict[str, float], totals: list[float], backend) -> tuple[dict[str, float], list[float]]:
    """Per-step metric sums and totals added over ranks (keys: the union of every rank's)."""
    if backend.world_size == 1:
        return sums, list(totals)
    keys: list = [None] * backend.world_size
    torch.distributed.all_gather_object(keys, sorted(sums))
    names = sorted({k for ks in keys for k in ks})
    values = backend.all_reduce_sum([sums.get(k, 0.0) for k in names] + [float(v) for v in totals])
    return dict(zip(names, values[: len(names)])), values[len(names):]
