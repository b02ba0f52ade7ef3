"""``align export RUN_DIR --out DIR``: a run's final model as one full Hugging Face folder (safetensors).

A LoRA run's ``final/`` is an adapter folder; export merges it into its base (W + s·BA, peft ``merge_and_unload``) so
that ``AutoModelForCausalLM.from_pretrained(DIR)`` — or vLLM, or any tool — loads it without peft. A full fine-tuning
run's final model is written out the same way. TARGET may also be an adapter folder or a model folder.
"""

from __future__ import annotations

import os
import shutil

import torch


def export(target: str, out: str, overrides: list[str] = ()) -> str:
    from .evalcmd import resolve
    from .models import load_model, load_tokenizer

    t = resolve(target, list(overrides))
    cfg = t.cfg
    model = load_model(t.model_path, cfg.model, torch.device("cpu"))  # adapters merged (align/models.py)
    model.config.use_cache = True  # training turns the KV cache off; the export is for generation
    tokenizer = load_tokenizer(cfg.model.tokenizer or t.model_path, cfg.model.trust_remote_code)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        from .configio import ConfigError

        raise ConfigError(f"--out {out} already exists and is not empty; give a new folder (export never overwrites)")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
