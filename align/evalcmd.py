"""``align eval`` and ``align generate``: the training-time evaluation and engines, on any checkpoint.

TARGET is a run directory (its ``config.yaml`` and ``final/`` model; for a pipeline, the last stage's), a YAML config
(its ``model.name``), or a Hugging Face model or LoRA adapter folder (then give ``eval.prompts=...``). ``key.sub=value``
overrides apply to the config, e.g. ``eval.n=8 eval.temperature=1.0 engine.name=vllm``.

Generation uses the configured engine (``engine.name``: transformers or vLLM, built as in training by
``align/online.py``). A LoRA model (a LoRA run's final/, or an adapter folder) is evaluated as the adapted model; its
KL reference is the same model with its adapters disabled (no second copy), unless ``--ref`` names another model.
vLLM starts from the base model folder and receives the merged weights W + s·BA (align/lora.py), as in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .config import RunConfig, build_loss, load_config
from .configio import ConfigError, load_yaml


@dataclass
class Target:
    cfg: RunConfig
    model_path: str  # what is evaluated
    base_path: str | None  # the starting point of training (the reference for KL), when known
    out_dir: str  # where eval.json goes


def resolve(target: str, overrides: list[str]) -> Target:
    if os.path.isdir(target) and os.path.isfile(os.path.join(target, "config.yaml")):
        raw = load_yaml(os.path.join(target, "config.yaml"))
        stages = raw.get("stages")
        previous = None
        if stages:  # a pipeline: the last stage's config and model; it started from the stage before
            target_dir = os.path.join(target, stages[-1]["name"])
            if len(stages) > 1:
                previous = os.path.join(target, stages[-2]["name"], "final")
            raw = {k: v for k, v in stages[-1].items() if k != "name"}
        else:
            target_dir = target
        cfg = load_config(None, overrides, base=raw).stages[-1].config
        model = os.path.join(target_dir, "final")
        if not os.path.isfile(os.path.join(model, "COMPLETE")):
            raise ConfigError(f"{target_dir} has no finished model (final/); train it first or point at a model folder")
        if previous is None:
            from .models import materialize_model  # tiny: the run's init-model; smollm2: its converted folder

            previous = materialize_model(cfg.model, target_dir, cfg.seed)
        base = previous
        return Target(cfg, model, base, target)
    if target.endswith((".yaml", ".yml")):
        pipe = load_config(target, overrides)
        cfg = pipe.stages[-1].config
        from .models import materialize_model

        path = materialize_model(cfg.model, cfg.run_dir, cfg.seed)
        return Target(cfg, path, None, cfg.run_dir)
    from . import lora

    if os.path.isfile(os.path.join(target, "config.json")) or lora.is_adapter_dir(target):
        base = {"model": {"name": target}, "data": {"train": "unused"}}
        pipe = load_config(None, overrides, base=base)
        return Target(pipe.stages[-1].config, target, None, ".")
    raise ConfigError(f"{target!r} is not a run directory, a YAML config, a model folder or a LoRA adapter folder")


def _load(path: str, cfg: RunConfig, device: torch.device):
    """(model, tokenizer); an adapter folder gives its base with the adapter on top, unmerged (align/lora.py)."""
    from . import lora
    from .models import load_model, load_tokenizer

    if lora.is_adapter_dir(path):
        model = lora.load_adapter_model(path, cfg.model, device)
    else:
        model = load_model(path, cfg.model, device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg.model.trust_remote_code)
    return model.eval(), tokenizer


def _engine(cfg: RunConfig, model, tokenizer, model_path: str):
    """The engine ``engine.name`` names, as training builds it, holding ``model``'s weights, with a progress bar."""
    from . import lora
    from .online import build_engine

    start, push = model_path, False
    if lora.is_peft(model):  # vLLM loads the base folder, then gets the merged weights
        start, push = lora.root_model(model_path), True
    engine = build_engine(cfg, model, tokenizer, start)
    engine.progress = True
    if push and engine.copies_weights:
        engine.load_weights(lora.merged_weights(model), version=0)
    return engine


def run_eval(target: str, overrides: list[str], ref: str | None = None, out: str | None = None) -> dict:
    from . import lora
    from .data import load_prompts
    from .evaluate import build_rewards, evaluate
    from .models import resolve_device

    t = resolve(target, overrides)
    cfg = t.cfg
    if build_loss(cfg.loss).output == "scores":  # a reward model: held-out pairwise accuracy (align/reward_eval.py)
        return _write_eval(_reward_eval(t), out or os.path.join(t.out_dir, "eval.json"))
    if not cfg.eval.prompts:
        raise ConfigError("eval.prompts is not set: give held-out prompts, e.g. eval.prompts=data/test.jsonl")
    device = resolve_device(cfg.backend.device)
    model, tokenizer = _load(t.model_path, cfg, device)
    prompts = load_prompts(cfg.eval.prompts, tokenizer, cfg.data, cfg.eval.limit)
    rewards = build_rewards(cfg.eval.rewards)
    engine = _engine(cfg, model, tokenizer, t.model_path)
    samples_path = os.path.join(t.out_dir, "samples", "eval-cli.jsonl")
    completions: list = []
    metrics = evaluate(engine, prompts, cfg.eval, rewards, seed=cfg.seed, samples_path=samples_path,
                       completions_out=completions)
    ref_model, ref_path = None, ref
    if ref is None and lora.is_peft(model):
        ref_model, ref_path = lora.AdapterDisabled(model), f"{t.model_path} (adapters disabled)"
    else:
        ref_path = ref or t.base_path
        if ref_path and os.path.abspath(ref_path) != os.path.abspath(t.model_path):
            ref_model, _ = _load(ref_path, cfg, device)
    if ref_model is not None:
        metrics["kl_to_ref"] = mean_kl_on_samples(model, ref_model, completions, cfg.model.chunk_tokens)
    result = {"model": t.model_path, "reference": ref_path, "engine": cfg.engine.name, "prompts": cfg.eval.prompts,
              "n": cfg.eval.n, "temperature": cfg.eval.temperature,
              "rewards": [{"name": r.name, "weight": r.weight} for r in rewards], "metrics": metrics,
              "samples": samples_path}
    return _write_eval(result, out or os.path.join(t.out_dir, "eval.json"))


def _write_eval(result: dict, out: str) -> dict:
    from .checkpoint import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))  # an interrupted write never leaves half a file
    result["out"] = out
    return result


def _reward_eval(t: Target) -> dict:
    from .models import resolve_device
    from .reward_eval import eval_reward_model

    metrics = eval_reward_model(t.model_path, t.cfg, resolve_device(t.cfg.backend.device))
    return {"model": t.model_path, "pairs": t.cfg.eval.pairs, "metrics": metrics}


@torch.no_grad()
def mean_kl_on_samples(model, ref_model, completions, chunk_tokens: int = 1024, batch_size: int = 32,
                       per: str = "token") -> float:
    """Mean KL(π‖π_ref) on the completions the model generated, exact over the vocabulary at every completion token:
    per token (``per="token"``), or per sequence (``per="sequence"``: Σ_t KL_t averaged over completions, a Monte-Carlo
    estimate of the sequence-level KL(π(·|x) ‖ π_ref(·|x)) when the completions are samples of π)."""
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    from .head import decoder_hidden, full_kl

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(completions), batch_size):
        chunk = [c for c in completions[i : i + batch_size] if c.token_ids]
        if not chunk:
            continue
        seqs = [c.prompt_ids + c.token_ids for c in chunk]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        att = torch.zeros(len(seqs), T, dtype=torch.bool, device=device)
        mask = torch.zeros_like(att)
        for r, (c, s) in enumerate(zip(chunk, seqs)):
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = True
            mask[r, len(c.prompt_ids) : len(s)] = True
        kl = full_kl(model, decoder_hidden(model, ids, att), ref_model, decoder_hidden(ref_model, ids, att), mask,
                     chunk_tokens=chunk_tokens)
        total += float(kl[mask].sum())
        count += int(mask.sum())
    if per == "sequence":
        return total / max(len(completions), 1)
    return total / max(count, 1)


def run_generate(target: str, overrides: list[str], prompts_path: str, out: str) -> int:
    from rollouts.engine import SamplingParams

    from .data import load_prompts
    from .models import resolve_device

    t = resolve(target, overrides)
    cfg = t.cfg
    device = resolve_device(cfg.backend.device)
    model, tokenizer = _load(t.model_path, cfg, device)
    prompts = load_prompts(prompts_path, tokenizer, cfg.data, cfg.eval.limit)
    engine = _engine(cfg, model, tokenizer, t.model_path)
    sampling = SamplingParams(temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed)
    comps = engine.generate([p.prompt_ids for p in prompts], sampling, n=cfg.eval.n)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for c in comps:
            p = prompts[c.prompt_index]
            f.write(json.dumps({"prompt": p.prompt_text, "completion": c.text, "finish_reason": c.finish_reason,
                                "num_tokens": len(c.token_ids), "index": p.index}) + "\n")
    os.replace(tmp, out)
    return len(comps)


def format_table(metrics: dict) -> str:
    lines = [f"{'metric':<22}{'value':>10}"]
    for k, v in metrics.items():
        lines.append(f"{k:<22}{v:>10.4f}" if isinstance(v, float) else f"{k:<22}{v!s:>10}")
    return "\n".join(lines)
