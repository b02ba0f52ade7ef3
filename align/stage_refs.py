"""``@stage:NAME`` in a pipeline stage's config: the final model of an earlier stage, ``RUN_DIR/NAME/final``.

Any string value of a stage's config may be such a reference, e.g. a learned reward in the RL stage
(``rollout.rewards: [{name: reward_model, path: "@stage:rm"}]``) or the model a stage starts from
(``model: {name: "@stage:sft"}``). It is replaced by the path when the config loads, so the stage's resolved
``config.yaml`` names the folder (``align eval`` reads it from there). Only stages that run *before* the one using
the reference can be named: their ``final/`` exists by the time the stage starts.
"""

from __future__ import annotations

import os
from typing import Any

from .configio import ConfigError

PREFIX = "@stage:"


def final_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, stage, "final")


def resolve(data: Any, *, run_dir: str, earlier: list[str], where: str) -> Any:
    """``data`` with every ``@stage:NAME`` string replaced by NAME's final folder; NAME must be in ``earlier``."""
    if isinstance(data, dict):
        return {k: resolve(v, run_dir=run_dir, earlier=earlier, where=f"{where}.{k}" if where else str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [resolve(v, run_dir=run_dir, earlier=earlier, where=f"{where}[{i}]") for i, v in enumerate(data)]
    if not (isinstance(data, str) and data.startswith(PREFIX)):
        return data
    name = data[len(PREFIX):]
    if name not in earlier:
        known = f"the stages before it are: {', '.join(earlier)}" if earlier else \
            "it is not preceded by any stage (references work between the `stages:` of a pipeline)"
        raise ConfigError(f"{where}: {data!r} names no earlier stage; {known}. A stage can use the final model of "
                          "a stage that runs before it")
    return final_dir(run_dir, name)
