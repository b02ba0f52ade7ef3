"""Runs a config: one stage, or a list of stages each starting from the previous stage's final weights (or, when a
stage sets ``model.name``, from that model, e.g. an earlier stage's final model as ``"@stage:NAME"``,
``align/stage_refs.py``).

Layout: a one-stage run writes straight into RUN_DIR; a pipeline gives every stage RUN_DIR/<stage name>/ (with its
own resolved ``config.yaml``, checkpoints, metrics and ``final/``) and writes RUN_DIR/summary.json at the end.

Resume (``resume: true``, the default) works per stage and inside a stage: running the same command again skips
every finished stage (its ``final/`` is complete) and continues the first unfinished one from its latest
checkpoint, starting it — as the first time — from the previous stage's ``final/``. A stage that has already run
with different training settings (model, data, loss, train, reference, seed) is an error rather than a silent mix
of two configs.
"""

from __future__ import annotations

import json
import logging
import os

import yaml

from .checkpoint import atomic_write_text, is_complete, latest_checkpoint
from .config import Pipeline
from .configio import ConfigError, to_dict

log = logging.getLogger("align")

# sections whose change makes an already started stage a different run (eval / log / engine may change freely)
_TRAINING_KEYS = ("seed", "model", "data", "loss", "train", "reference", "peft")


def stage_dirs(pipe: Pipeline) -> list[str]:
    if len(pipe.stages) == 1:
        return [pipe.run_dir]
    return [os.path.join(pipe.run_dir, s.name) for s in pipe.stages]


def _finished(stage_dir: str) -> dict | None:
    """The summary of a finished stage (its final/ complete), else None."""
    path = os.path.join(stage_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    final = os.path.join(stage_dir, "final")  # not the recorded path: the run directory may have moved
    if not (summary.get("final_model") and is_complete(final)):
        return None
    return {**summary, "final_model": final}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in new:
            if k in old:  # keys added by a newer align are not differences
                out += _differences(old[k], new[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def _check_unchanged(name: str, stage_dir: str, resolved: dict) -> None:
    """A stage that has progress (checkpoints or final/) must be resumed with the training settings it ran with."""
    path = os.path.join(stage_dir, "config.yaml")
    if not os.path.exists(path) or not (latest_checkpoint(stage_dir) or is_complete(os.path.join(stage_dir, "final"))):
        return
    with open(path, encoding="utf-8") as f:
        old = yaml.safe_load(f) or {}
    changed = _differences({k: old.get(k) for k in _TRAINING_KEYS if k in old},
                           {k: resolved[k] for k in _TRAINING_KEYS if k in old})
    if changed:
        raise ConfigError(
            f"stage '{name}' in {stage_dir} already ran with other settings ({'; '.join(changed[:5])}). Resuming "
            "would mix two runs: use a new run_dir, or resume=false to start the stages again")


def run(pipe: Pipeline) -> dict[str, dict]:
    from .trainer import Trainer

    os.makedirs(pipe.run_dir, exist_ok=True)
    dirs = stage_dirs(pipe)
    resolved = [to_dict(s.config) for s in pipe.stages]
    for stage, stage_dir, res in zip(pipe.stages, dirs, resolved):  # before anything is written or trained
        if stage.config.resume:
            _check_unchanged(stage.name, stage_dir, res)
    top = {"stages": [{"name": s.name, **r} for s, r in zip(pipe.stages, resolved)]} if len(pipe.stages) > 1 \
        else resolved[0]
    atomic_write_text(os.path.join(pipe.run_dir, "config.yaml"), yaml.safe_dump(top, sort_keys=False))
    results: dict[str, dict] = {}
    init = None
    for stage, stage_dir, res in zip(pipe.stages, dirs, resolved):
        done = _finished(stage_dir) if stage.config.resume else None
        if done is not None:
            log.info("stage %s already finished; skipping", stage.name)
            if len(pipe.stages) > 1:
                print(f"== stage {stage.name}: finished earlier, skipped ==", flush=True)
            results[stage.name] = done
        else:
            if len(pipe.stages) > 1:
                os.makedirs(stage_dir, exist_ok=True)
                atomic_write_text(os.path.join(stage_dir, "config.yaml"), yaml.safe_dump(res, sort_keys=False))
                start = f"from {init}" if init and stage.from_previous else f"from {stage.config.model.name}"
                print(f"== stage {stage.name} ({stage.config.loss.name}) {start} ==", flush=True)
            init_path = init if stage.from_previous else None  # else the stage's own model.name
            results[stage.name] = Trainer(stage.config, stage_dir, init_path=init_path).fit()
        init = results[stage.name].get("final_model")
        if init is None:  # stopped early (signal / max_steps): later stages cannot start
            break
    if len(pipe.stages) > 1:
        atomic_write_text(os.path.join(pipe.run_dir, "summary.json"), json.dumps(results, indent=2))
    return results


def report(results: dict[str, dict]) -> str:
    """A small table of before/after evaluation metrics per stage."""
    lines = []
    for name, summary in results.items():
        before, after = summary.get("before") or {}, summary.get("after") or {}
        keys = [k for k in ("accuracy", "pass@1", "mean_length", "pref_accuracy", "pref_logp_accuracy", "pref_margin")
                if k in before or k in after]
        keys += sorted(k for k in after if k.startswith("pass@") and k not in keys)
        keys += _reward_keys(before, after)
        if not keys:
            continue
        w = max(14, max(len(k) for k in keys) + 2)
        lines.append(f"[{name}] {'metric':<{w}}{'before':>10}{'after':>10}")
        for k in keys:
            b = f"{before[k]:.3f}" if k in before else "-"
            a = f"{after[k]:.3f}" if k in after else "-"
            lines.append(f"[{name}] {k:<{w}}{b:>10}{a:>10}")
    return "\n".join(lines)


def _reward_keys(before: dict, after: dict) -> list[str]:
    """A reward model's held-out scores; and every eval reward term when there are several (the first is already
    `accuracy`), e.g. a verifier next to a learned reward."""
    keys = [k for k in ("pref_reward_chosen", "pref_reward_rejected", "pref_sign_accuracy") if k in before or k in after]
    terms = sorted({k for k in (*before, *after) if k.startswith("reward/") and not k.endswith("/failures")})
    gaps = sorted({k for k in (*before, *after) if k.startswith("gap/")})  # align/evaluate.py
    return keys + (terms if len(terms) > 1 else []) + gaps
