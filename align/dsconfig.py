"""The DeepSpeed config, generated from ours: one source of truth.

align's config decides everything the training math depends on (batch, clipping, precision, ZeRO stage, offload,
optimizer, schedule); :func:`build` turns it into the dict ``deepspeed.initialize`` takes. A user may add their own
DeepSpeed JSON (``backend.deepspeed_config``) for the knobs align does not set (bucket sizes, overlap_comm,
persistence thresholds, pinned memory, ...). The JSON wins for those keys; for the keys in :data:`OWNED` align's
config wins, and a JSON that sets one of them to a different value is an error naming both keys (``"auto"``, the
Hugging Face convention, means "fill from align" and is accepted).

Micro-batches and optimizer steps are the trainer's (length-grouped micro-batches, one ``engine.step()`` per
optimizer batch): the generated config says ``managed_gradient_accumulation: false``, so DeepSpeed neither counts
micro-steps nor divides the loss by ``gradient_accumulation_steps``. Its batch keys are consistent bookkeeping only.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from .configio import ConfigError

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# JSON key path → the align key it is generated from. For these, align's value wins.
OWNED = {
    ("train_batch_size",): "train.batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.batch_size / (world size × train.micro_batch_size)",
    ("gradient_clipping",): "train.grad_clip",
    ("managed_gradient_accumulation",): "the trainer (it calls engine.step() once per optimizer batch)",
    ("zero_optimization", "stage"): "backend.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "backend.offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "backend.offload_params",
    ("bf16", "enabled"): "backend.precision",
    ("fp16", "enabled"): "backend.precision",
}
# Size knobs a JSON may leave to align as "auto": the values Hugging Face's Trainer integration derives from the
# model's hidden size h (transformers.integrations.deepspeed, HfTrainerDeepSpeedConfig.trainer_config_finalize).
AUTO_FROM_HIDDEN = {
    ("zero_optimization", "reduce_bucket_size"): lambda h: h * h,
    ("zero_optimization", "stage3_prefetch_bucket_size"): lambda h: int(0.9 * h * h),
    ("zero_optimization", "stage3_param_persistence_threshold"): lambda h: 10 * h,
}
# Whole sections align builds itself; a JSON must not define them.
FORBIDDEN = {
    "optimizer": "align builds AdamW from train.lr / adam_betas / adam_eps / weight_decay",
    "scheduler": "align's schedule comes from train.warmup_steps / schedule / min_lr_ratio",
}


def read_json(path: str, where: str = "backend.deepspeed_config") -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file {path!r}; give a DeepSpeed JSON such as examples/ds_zero2.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path} must hold a JSON object")
    return data


def world_size_from_env() -> int:
    """The number of processes the launcher (torchrun / deepspeed) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def generated(cfg, world_size: int) -> dict:
    """The keys align owns, from a RunConfig."""
    t, b = cfg.train, cfg.backend
    per_rank = math.ceil(t.batch_size / world_size)
    gas = max(1, math.ceil(per_rank / t.micro_batch_size))
    zero: dict[str, Any] = {"stage": b.zero_stage}
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if b.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * world_size,
        "gradient_clipping": float(t.grad_clip or 0.0),
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "bf16": {"enabled": b.precision == "bf16"},
        "fp16": {"enabled": b.precision == "fp16"},
    }
    return out


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


_MISSING = object()


def _set(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=0)
    return a == b


def merge(user: dict, ours: dict, source: str) -> dict:
    """``user`` (a DeepSpeed JSON) completed with ``ours``; an owned key set differently in ``user`` is an error."""
    for section, why in FORBIDDEN.items():
        if section in user:
            raise ConfigError(f"{source}: remove the \"{section}\" section; {why} (align's config wins for it)")
    out = copy.deepcopy(user)
    for path, align_key in OWNED.items():
        mine = _get(ours, path)
        theirs = _get(user, path)
        if mine is _MISSING:
            if theirs is not _MISSING and theirs != "auto" and not (path[-1] == "device" and theirs == "none"):
                raise ConfigError(
                    f"{source}: \"{'.'.join(path)}\" is {theirs!r}, but align sets it from {align_key}, which "
                    f"leaves it off; align's config wins for this key: set {align_key} or remove the key from the JSON")
            continue
        if theirs is not _MISSING and theirs != "auto" and not _same(theirs, mine):
            raise ConfigError(
                f"{source}: \"{'.'.join(path)}\" is {theirs!r}, but align sets it to {mine!r} from {align_key}; "
                f"align's config wins for this key: change {align_key} or remove the key (or write \"auto\")")
        _set(out, path, mine)
    return out


def hidden_size(cfg, model_path: str | None) -> int | None:
    """The model's hidden size, for "auto" bucket sizes (None when it cannot be read)."""
    if cfg.model.name == "tiny" and model_path is None:
        return cfg.model.tiny.hidden_size
    path = model_path or cfg.model.name
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        try:
            from transformers import AutoConfig

            data = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).to_dict()
        except Exception:
            return None
    data = data.get("text_config", data)
    return data.get("hidden_size") or data.get("d_model") or data.get("n_embd")


def build(cfg, world_size: int, model_path: str | None = None, fill_auto: bool = True) -> dict:
    """The DeepSpeed config for a RunConfig: ours, merged into the user's JSON if there is one. ``model_path``:
    where the model's config.json is (for "auto" sizes; default ``model.name``); ``fill_auto=False`` checks
    everything else (config validation, before the model exists)."""
    ours = generated(cfg, world_size)
    b = cfg.backend
    user = read_json(b.deepspeed_config) if b.deepspeed_config else {}
    out = merge(user, ours, b.deepspeed_config or "deepspeed config")
    if b.offload_optimizer and not b.cpu_adam:
        # a torch optimizer on offloaded (CPU) states (backend.cpu_adam: false): slower than DeepSpeedCPUAdam, no build
        out["zero_force_ds_cpu_optimizer"] = False
    if b.zero_stage == 0 and b.precision == "fp32":
        # stage 0 + fp32 runs the plain torch optimizer, which DeepSpeed neither checks for NaN/Inf nor reports the
        # norm of: align's GuardedAdamW clips to train.grad_clip, reports the norm and skips non-finite steps instead
        out["gradient_clipping"] = 0.0
    source = b.deepspeed_config or "deepspeed config"
    zero = out.get("zero_optimization", {})
    if zero.get("overlap_comm") and b.zero_stage < 2:
        raise ConfigError(f"{source}: \"zero_optimization.overlap_comm\" needs backend.zero_stage 2 or 3 (align "
                          "steps once per optimizer batch; at stages 0/1 DeepSpeed then reduces inside step())")
    autos = [path for path in AUTO_FROM_HIDDEN if _get(out, path) == "auto"]
    if autos and not fill_auto:
        for path in autos:
            _set(out, path, 1)  # placeholder: filled from the model when training starts
    elif autos:
        h = hidden_size(cfg, model_path)
        if h is None:
            raise ConfigError(f"{source}: \"{'.'.join(autos[0])}\" is \"auto\", but the model's hidden size cannot be "
                              "read from its config.json; write a number")
        for path in autos:
            _set(out, path, AUTO_FROM_HIDDEN[path](h))
    leftover = [k for k, v in _flatten(out) if v == "auto"]
    if leftover:
        raise ConfigError(f"{source}: \"{leftover[0]}\" is \"auto\", which align fills only for "
                          f"{', '.join('.'.join(p) for p in list(OWNED) + list(AUTO_FROM_HIDDEN))}; write a value")
    out.setdefault("steps_per_print", 1 << 30)  # align logs its own metrics
    out.setdefault("wall_clock_breakdown", False)
    return out


def inference_config(train_config: dict) -> dict:
    """A config for a frozen model (the reference) sharded like the policy under ZeRO-3: no optimizer, no offload
    of optimizer states, the same precision and parameter-offload choice."""
    zero = dict(train_config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    out = {k: train_config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                        "train_batch_size", "bf16", "fp16", "steps_per_print",
                                        "wall_clock_breakdown") if k in train_config}
    out["zero_optimization"] = zero
    return out


def check(cfg, world_size: int | None = None) -> None:
    """Cross-section checks of a RunConfig's backend, before any model is loaded. Raises ConfigError."""
    b, m = cfg.backend, cfg.model
    if b.name == "torch":  # (DeepSpeed-only keys with the torch backend: BackendConfig.check)
        ws = world_size_from_env() if world_size is None else world_size
        if ws > 1:
            raise ConfigError(f"launched as {ws} processes, but backend.name is torch (one process); set "
                              "backend.name: deepspeed for multi-process training")
        return
    if m.dtype != "float32" and m.dtype != PRECISIONS[b.precision]:
        raise ConfigError(f"model.dtype={m.dtype!r} conflicts with backend.precision={b.precision!r}; with DeepSpeed, "
                          "backend.precision sets the training precision (fp32 master weights are kept by the "
                          f"optimizer); set model.dtype: float32 or {PRECISIONS[b.precision]}")
    ws = world_size_from_env() if world_size is None else world_size
    if cfg.train.batch_size < ws:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is smaller than the {ws} processes; every rank needs "
                          "at least one example per optimizer step")
    build(cfg, ws, fill_auto=False)
