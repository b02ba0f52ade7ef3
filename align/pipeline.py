"""Runs a config: one stage, or a list of stages each starting from the previous stage's final weights.

Layout: a one-stage run writes straight into RUN_DIR; a pipeline gives every stage RUN_DIR/<stage name>/.
Resume works per stage (a finished stage is skipped) and inside a stage (from its latest checkpoint).
"""

from __future__ import annotations

import json
import logging
import os

import yaml

from .checkpoint import atomic_write_text
from .config import Pipeline
from .configio import to_dict

log = logging.getLogger("align")


def stage_dirs(pipe: Pipeline) -> list[str]:
    if len(pipe.stages) == 1:
        return [pipe.run_dir]
    return [os.path.join(pipe.run_dir, s.name) for s in pipe.stages]


def _finished(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    final = summary.get("final_model")
    return summary if final and os.path.isfile(os.path.join(final, "COMPLETE")) else None


def run(pipe: Pipeline) -> dict[str, dict]:
    from .trainer import Trainer

    os.makedirs(pipe.run_dir, exist_ok=True)
    resolved = {"stages": [{"name": s.name, **to_dict(s.config)} for s in pipe.stages]} \
        if len(pipe.stages) > 1 else to_dict(pipe.stages[0].config)
    atomic_write_text(os.path.join(pipe.run_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
    results: dict[str, dict] = {}
    init = None
    for stage, stage_dir in zip(pipe.stages, stage_dirs(pipe)):
        done = _finished(stage_dir) if stage.config.resume else None
        if done is not None:
            log.info("stage %s already finished; skipping", stage.name)
            results[stage.name] = done
        else:
            if len(pipe.stages) > 1:
                print(f"== stage {stage.name} ({stage.config.loss.name}) ==", flush=True)
            results[stage.name] = Trainer(stage.config, stage_dir, init_path=init).fit()
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
        if not keys:
            continue
        lines.append(f"[{name}] {'metric':<14}{'before':>10}{'after':>10}")
        for k in keys:
            b = f"{before[k]:.3f}" if k in before else "-"
            a = f"{after[k]:.3f}" if k in after else "-"
            lines.append(f"[{name}] {k:<14}{b:>10}{a:>10}")
    return "\n".join(lines)
