"""DeepSpeed ZeRO backend: the same interface as ``TorchBackend``, over the processes a launcher started.

ZeRO stage 0 is plain data parallelism; 1 shards optimizer states across ranks, 2 also gradients, 3 also parameters
(Rajbhandari et al. 2020, arXiv 1910.02054). Optimizer states and parameter shards may live in CPU memory
(ZeRO-Offload). The optimizer (AdamW) and the learning-rate schedule are align's own, built from ``train.*`` exactly
as in ``TorchBackend``; the DeepSpeed config is generated from our config (``align/dsconfig.py``).

Loss scaling across micro-batches and ranks. A loss returns this micro-batch's *share* of the optimizer-batch loss,
normalised with global (all-rank) counts, so Σ_ranks Σ_micro share = the loss of the whole batch. DeepSpeed runs with
``managed_gradient_accumulation: false`` and ``backward(..., scale_wrt_gas=False)``, so it does not divide by the
accumulation steps; its data-parallel reduction *averages* gradients over the W ranks, i.e. applies 1/W. We therefore
backpropagate W · share: (1/W) Σ_r ∇(W · share_r) = ∇ Σ_r share_r, the gradient of the global loss — the same as
one process on the whole batch (tests/test_deepspeed.py checks the trajectories agree).

ZeRO-3 forwards go through the engine's root module (:class:`LogprobModule`: decoder + chunked fp32 head), so
DeepSpeed's hooks gather each module's parameters when it runs and release them after; every rank makes the same
number of LM-head calls (``align/distributed.py``).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict
from typing import Iterable, Iterator

import torch

from . import lora
from .backend import lr_lambda, param_groups
from .distributed import Dist, agreed_chunks, all_reduce_max, all_reduce_sum
from .head import forward_logprobs

log = logging.getLogger("align")

STATE_DIR = "deepspeed"  # inside a checkpoint folder: DeepSpeed's own sharded state (every rank writes its part)
STATE_TAG = "state"


class LogprobModule(torch.nn.Module):
    """One root module for DeepSpeed to wrap: (input_ids, attention_mask, loss_mask) → (hidden (B, T, H), fp32
    log-probs (B, T), entropy (B, T) or None), with the LM head applied only at loss positions (align/head.py).
    ``forward_fn`` replaces that forward for a model whose loss wants another output (align/scores.py)."""

    def __init__(self, model: torch.nn.Module, forward_fn=forward_logprobs):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, input_ids, attention_mask, loss_mask, chunk_tokens: int = 1024, with_entropy: bool = False,
                n_chunks: int | None = None, temperature: float = 1.0):
        return self.forward_fn(self.model, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens,
                               with_entropy=with_entropy, n_chunks=n_chunks, temperature=temperature)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm and skips a non-finite step, for ZeRO stage 0 in fp32.

    There DeepSpeed runs the client optimizer as is, without an overflow check or a reported norm. DeepSpeed's engine
    reads ``overflow`` (``was_step_applied()``) and ``_global_grad_norm`` (``get_global_grad_norm()``) after
    ``step()``, so this gives stage 0 the behaviour of ``TorchBackend.step`` and of ZeRO 1–3. Gradients are already
    averaged over ranks here, so every rank computes the same norm."""

    def __init__(self, params, max_norm: float | None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm if max_norm else float("inf")
        self.overflow = False
        self._global_grad_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            return None
        return super().step(closure)


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


class DeepSpeedBackend:
    """``deepspeed.initialize`` around the policy; align's optimizer, schedule, loss scaling and checkpoints."""

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int, dist: Dist, forward_fn=forward_logprobs):
        import deepspeed

        self.cfg = cfg.train
        self.bcfg = cfg.backend
        self.dist = dist
        self.rank, self.world_size, self.is_main = dist.rank, dist.world_size, dist.is_main
        self.stage = cfg.backend.zero_stage
        self.ds_config = dist.ds_config
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        t = cfg.train
        groups = param_groups(model, t.weight_decay)
        kwargs = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
        if self.bcfg.offload_optimizer and self.bcfg.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        elif self.stage == 0 and self.bcfg.precision == "fp32":
            optimizer = GuardedAdamW(groups, max_norm=t.grad_clip, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        self.engine, _, _, _ = deepspeed.initialize(model=LogprobModule(model, forward_fn), optimizer=optimizer,
                                                    config=self.ds_config, dist_init_required=False)
        self.optimizer = optimizer  # the base optimizer: its param_groups carry the learning rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
        self._runners: dict[int, tuple] = {}  # id(model) → (weakref to it, its DeepSpeed engine)
        self._register(model, self.engine)

    # ------------------------------------------------------------------------------------------ process group
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.dist.device) if self.world_size > 1 else list(values)

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return all_reduce_max(values, self.dist.device) if self.world_size > 1 else list(values)

    def barrier(self) -> None:
        self.dist.barrier()

    # ------------------------------------------------------------------------------------------------ forward
    def prepare_reference(self, ref: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference policy). ZeRO-3: wrapped in an inference-only engine (no optimizer), so it is
        sharded like the policy and gathered module by module. Stages 0–2 keep whole parameters on every rank, for
        the reference too."""
        if self.stage == 3:
            import deepspeed

            from .dsconfig import inference_config

            engine, _, _, _ = deepspeed.initialize(model=LogprobModule(ref), config=inference_config(self.ds_config),
                                                   dist_init_required=False)
            engine.eval()
            self._register(ref, engine)
        return ref

    def _register(self, model: torch.nn.Module, engine) -> None:
        self._runners = {k: v for k, v in self._runners.items() if v[0]() is not None}  # forget freed models
        self._runners[id(model)] = (weakref.ref(model), engine)

    def _engine_for(self, model: torch.nn.Module):
        entry = self._runners.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1]
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            # a frozen model loaded while ZeRO-3 is on (transformers loads it into shards, e.g. a reference for a
            # precompute pass): it runs only through an engine, so it gets an inference one on first use
            self.prepare_reference(model)
            return self._runners[id(model)][1]
        return None

    def forward(self, model, input_ids, attention_mask, loss_mask, *, chunk_tokens: int, with_entropy: bool = False,
                temperature: float = 1.0):
        """(hidden, log-probs, entropy) of ``model`` — through its DeepSpeed engine when this backend wraps it."""
        host = getattr(model, "adapter_host", None)
        if host is not None:  # LoRA reference (align/lora.py AdapterDisabled): the policy's engine, adapters off
            with model.disabled():
                return self.forward(host, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens,
                                    with_entropy=with_entropy)
        engine = self._engine_for(model)
        if engine is None:
            return forward_logprobs(model, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens,
                                    with_entropy=with_entropy, temperature=temperature)
        n_chunks = self.agreed_chunks(loss_mask, chunk_tokens)
        return engine(input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens, with_entropy=with_entropy,
                      n_chunks=n_chunks, temperature=temperature)

    def agreed_chunks(self, loss_mask: torch.Tensor, chunk_tokens: int) -> int | None:
        """LM-head chunk count shared by all ranks (ZeRO-3 with several ranks), else None (each rank its own)."""
        if self.stage == 3 and self.world_size > 1:
            return agreed_chunks(loss_mask, chunk_tokens, self.dist.device)
        return None

    # ------------------------------------------------------------------------------------------------ update
    def backward(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach())):
            # a non-finite share poisons every gradient it reaches (NaN · ∂loss), so DeepSpeed's overflow check (and
            # GuardedAdamW at stage 0) discards the whole step on every rank — even when the NaN sat in a constant
            loss = loss * float("nan")
        # × W: DeepSpeed averages gradients over ranks; the shares already carry the global normalisation
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        """Reduce (stages 0/1), clip and apply the accumulated gradient. Returns (grad_norm, applied)."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self.scheduler.step()
        return norm, applied

    def skip_step(self) -> None:
        """All ranks agreed a loss was not finite: its NaN-poisoned gradient makes DeepSpeed drop the step and clear
        its gradient buffers (the schedule still advances, as with TorchBackend)."""
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update whose loss was not finite; please report this")
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Written by rank 0 next to DeepSpeed's own state (:meth:`save_state`)."""
        return {"backend": "deepspeed", "zero_stage": self.stage, "world_size": self.world_size,
                "precision": self.bcfg.precision, "scheduler": self.scheduler.state_dict()}

    def save_state(self, folder: str) -> None:
        """Every rank writes its shard of the model and optimizer state (DeepSpeed's layout) under folder/deepspeed.
        LoRA: without the frozen base weights (they come from the base model on resume)."""
        self.engine.save_checkpoint(os.path.join(folder, STATE_DIR), tag=STATE_TAG, save_latest=False,
                                    exclude_frozen_parameters=lora.is_peft(self.model))

    def load_state_dict(self, state: dict, path: str | None = None) -> None:
        from .checkpoint import CheckpointError

        where = path or "the checkpoint"
        if state.get("backend") != "deepspeed":
            raise CheckpointError(f"{where} was written by the {state.get('backend', 'torch')} backend; resume it with "
                                  "that backend, or start this run from its model/ folder (model.name) in a new run_dir")
        for key, mine in (("zero_stage", self.stage), ("world_size", self.world_size)):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"{where} was written with {key}={state.get(key)}, this run has {key}={mine}; resume with the same "
                    "setting (or convert the DeepSpeed state with deepspeed.checkpoint.ds_to_universal)")
        if path is None or not os.path.isdir(os.path.join(path, STATE_DIR)):
            raise CheckpointError(f"{where} has no {STATE_DIR}/ folder (DeepSpeed state); it is incomplete")
        self.engine.load_checkpoint(os.path.join(path, STATE_DIR), tag=STATE_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False, load_module_strict=not lora.is_peft(self.model))
        self.scheduler.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------------------------------------- weights out
    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full tensors in Hugging Face naming (``state_dict()`` keys, tied weights under both names), for pushing into
        a generation engine or writing a model. Every rank must iterate it to the end (ZeRO-3 gathers collectively).

        ZeRO-3: a generator that gathers one module's parameters at a time (``zero.GatheredParameters``), yields a
        copy of each, and re-shards them before moving on, so besides the shards only one module is ever whole (plus
        the copy the consumer holds). Consume each tensor before asking for the next (``VLLMEngine.load_weights``
        does) to keep the peak at one module. Stages 0–2: every rank already holds whole parameters.

        LoRA: the merged W + s·BA (align/lora.py ``merged_weights``), gathered module by module under ZeRO-3."""
        if lora.is_peft(self.model):
            return lora.merged_weights(self.model, gather=self._gather if self.stage == 3 else None,
                                       copy=self.stage == 3)
        if self.stage != 3:
            return self.model.state_dict().items()
        return self._gathered_weights()

    @staticmethod
    def _gather(tensors):
        import deepspeed

        return deepspeed.zero.GatheredParameters([t for t in tensors if hasattr(t, "ds_id")], modifier_rank=None)

    def _gathered_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        by_module: OrderedDict[str, list[tuple[str, torch.Tensor]]] = OrderedDict()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            by_module.setdefault(name.rpartition(".")[0], []).append((name, tensor))
        for items in by_module.values():
            sharded = [t for _, t in items if hasattr(t, "ds_id")]
            with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
                for name, tensor in items:
                    yield name, tensor.detach().clone()

    def save_model(self, path: str, tokenizer=None) -> None:
        """A consolidated Hugging Face folder (safetensors) written by rank 0; every rank must call it (ZeRO-3
        gathers). Under mixed precision the weights are the 16-bit model weights (as DeepSpeed's save_16bit_model);
        the fp32 master weights are in the checkpoint's deepspeed/ state (zero_to_fp32 reads them). LoRA: the adapter
        folder (align/lora.py), its tensors gathered first under ZeRO-3."""
        if lora.is_peft(self.model):
            state = lora.gathered_trainable_state(self.model, self._gather) if self.stage == 3 else None
            lora.save_adapter(self.model, path, tokenizer, state_dict=state, is_main=self.is_main)
            return
        # tied weights (embeddings / LM head) are one Parameter under several names: write it once, as
        # save_pretrained does for an ordinary model, and from_pretrained ties it again
        first: dict[int, str] = {}
        alias = {name: first.setdefault(id(t), name) for name, t in self.model.state_dict(keep_vars=True).items()}
        state = {}
        for name, tensor in self.named_weights():
            if self.is_main and alias.get(name, name) == name:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.is_main:
            self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------------------------------- measurement
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state (see align/zero_memory.py)."""
        from .zero_memory import engine_bytes

        return engine_bytes(self.engine, self.optimizer)
