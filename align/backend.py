"""Backends own the model's parameters, the optimizer and the gradient step. The loop is the same for all.

``TorchBackend``: one process, CPU or one GPU. AdamW, linear warm-up then cosine / linear / constant decay,
global-norm gradient clipping, gradient accumulation by summing each micro-batch's share of the loss.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from . import lora
from .config import TrainConfig
from .head import forward_logprobs


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warm = max(cfg.warmup_steps, 0)
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        span = max(total_steps - warm, 1)
        progress = min(max(step - warm, 0) / span, 1.0)
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as is usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        dims = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 shards keep their full shape in ds_shape
        (no_decay if dims < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class TorchBackend:
    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, forward_fn=forward_logprobs):
        self.model = model
        self.cfg = cfg
        self.forward_fn = forward_fn  # the trained model's forward (align/scores.py: per the loss's output)
        device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        """Clip and apply the accumulated gradient. Returns (grad_norm, applied); a non-finite norm skips it."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, applied

    def skip_step(self) -> None:
        """Drop the accumulated gradient of a step whose loss was not finite (the schedule still advances)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict, path: str | None = None) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_state(self, folder: str) -> None:
        """State that every rank writes itself (DeepSpeed shards); one process has none beyond ``state_dict``."""

    def barrier(self) -> None:
        pass

    # -- forwards: the backend runs the models it owns (DeepSpeed routes them through its engines) -----------------
    def prepare_reference(self, ref: torch.nn.Module) -> torch.nn.Module:
        return ref

    def forward(self, model, input_ids, attention_mask, loss_mask, *, chunk_tokens: int, with_entropy: bool = False,
                temperature: float = 1.0):
        """(hidden (B, T, H), log-probs (B, T), entropy or None) of ``model`` on a micro-batch (align/head.py); for
        the trained model, what its ``forward_fn`` gives (a reward model: (None, (B,) scores, None))."""
        fn = self.forward_fn if model is self.model else forward_logprobs  # frozen references are policies
        return fn(model, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens, with_entropy=with_entropy,
                  temperature=temperature)

    def agreed_chunks(self, loss_mask: torch.Tensor, chunk_tokens: int) -> None:
        return None  # one process: each LM-head call is local

    def save_model(self, path: str, tokenizer=None) -> None:
        """A Hugging Face folder; for a LoRA policy the adapter folder (align/lora.py)."""
        if lora.is_peft(self.model):
            lora.save_adapter(self.model, path, tokenizer)
            return
        self.model.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full, unsharded tensors in Hugging Face naming (for pushing into a generation engine); a LoRA policy's
        merged W + s·BA, computed one module at a time."""
        return lora.hf_weights(self.model)


def build_backend(model: torch.nn.Module, cfg, total_steps: int, dist=None, output: str = "logprobs"):
    """The backend ``cfg.backend.name`` names: TorchBackend, or DeepSpeedBackend over ``dist``'s process group.
    ``output``: what the trained model computes for the loss (``losses.OUTPUTS``)."""
    from .scores import forward_fn

    if cfg.backend.name == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, total_steps, dist, forward_fn=forward_fn(output))
    return TorchBackend(model, cfg.train, total_steps, forward_fn=forward_fn(output))
