"""Loading policies and tokenizers, and the few model facts the trainer needs."""

from __future__ import annotations

import logging
import os

import torch

from .config import ModelConfig

log = logging.getLogger("align")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def materialize_model(cfg: ModelConfig, run_dir: str, seed: int) -> str:
    """The folder to load from: ``cfg.name`` itself; for ``tiny`` a model built offline into the run directory; for
    a packaged model (``smollm2``, see ``align/prepared.py``) its cached conversion, converted on first use."""
    if cfg.name != "tiny":
        from .prepared import resolve_model

        return resolve_model(cfg.name) or cfg.name
    from .tiny import save_tiny

    path = os.path.join(run_dir, "init-model")
    if not os.path.exists(os.path.join(path, "config.json")):
        tmp = path + f".tmp-{os.getpid()}"
        save_tiny(tmp, seed=seed, **vars(cfg.tiny))
        os.replace(tmp, path)
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an EOS token; set one and save it")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, cfg: ModelConfig, device: torch.device):
    """A causal LM from ``path`` in ``cfg.dtype`` on ``device``, dropout off (as TRL's disable_dropout). A LoRA adapter
    folder (a LoRA run's checkpoint or final/) loads as its base model with the adapter merged in (align/lora.py)."""
    from transformers import AutoModelForCausalLM

    from . import lora

    if lora.is_adapter_dir(path):
        return lora.load_merged(path, cfg, device)

    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    disable_dropout(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 shards keep the full size in ds_numel)
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
