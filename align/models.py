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


def load_model(path: str, cfg: ModelConfig, device: torch.device, output: str = "logprobs",
               pad_token_id: int | None = None):
    """The model a loss's ``output`` needs from ``path``, in ``cfg.dtype`` on ``device``, dropout off (as TRL's
    disable_dropout): a causal LM for ``"logprobs"``; for ``"scores"`` a sequence-classification model with one
    output (a causal-LM checkpoint gets a freshly initialised score head, as TRL's RewardTrainer does) whose
    ``config.pad_token_id`` is set (its score is read at the last non-pad token). A LoRA adapter folder (a LoRA run's
    checkpoint or final/) loads as its base model with the adapter merged in (align/lora.py)."""
    from transformers import AutoModelForCausalLM

    from . import lora

    if lora.is_adapter_dir(path):
        if output == "scores":
            raise ValueError(f"{path} holds LoRA adapters; a reward model starts from full weights: merge them first "
                             f"(align export {path} OUT) and give that folder")
        return lora.load_merged(path, cfg, device)

    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if output == "scores":
        model = _load_scorer(path, kwargs, pad_token_id)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    disable_dropout(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_scorer(path: str, kwargs: dict, pad_token_id: int | None):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
    if getattr(config, "num_labels", 1) != 1 and any(a.endswith("ForSequenceClassification")
                                                     for a in config.architectures or []):
        raise ValueError(f"{path} is a sequence-classification model with {config.num_labels} outputs; a reward model "
                         "has one (num_labels=1)")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
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
