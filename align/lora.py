"""LoRA adapters through peft, for every loss (README "LoRA").

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes each adapted weight W (out × in) and learns a low-rank update:

    W' = W + s · B A,    B: out × r (zero at the start), A: r × in,    s = alpha / r  (rslora: alpha / √r)

so at step 0 the adapted model *is* the base model, and the base model is always one switch away. align uses that
switch as the reference policy of the losses that need one (DPO, ASFT, KL-regularised PG): :class:`AdapterDisabled`
runs the policy's own modules under ``peft``'s ``disable_adapter()``, so there is no second copy of the weights.

What lives here (peft does the adapter itself; this module only wires it into the trainer):

- :func:`attach` — validate ``peft:`` against the loaded model (target modules that match nothing name the ones that
  exist) and wrap it with ``peft.get_peft_model``; :func:`load_policy` — base (+ a saved adapter on resume);
- :class:`AdapterDisabled` — the reference view;
- :func:`merged_weights` — ``(name, W + s·BA)`` in the base model's ``state_dict`` naming, one module at a time, for
  pushing into a generation engine or exporting (the model is never materialised twice);
- :func:`save_adapter` / :func:`load_merged` / :func:`adapter_base` — adapter folders (peft's format plus
  ``align_lora.json`` recording where the base model is).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Iterator

import torch

from .configio import ConfigError

log = logging.getLogger("align")

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "align_lora.json"  # {"base": absolute path, "base_relative": path relative to the adapter folder}
_ADAPTER_MARKERS = (".lora_", ".base_layer.", ".modules_to_save.", ".original_module.")


# --------------------------------------------------------------------------------------------- adapter folders
def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def is_adapter_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model folder of adapter folder ``path``: the recorded absolute path, else the same place relative to
    the adapter (the run directory moved), else peft's ``base_model_name_or_path`` (a hub id)."""
    candidates = []
    meta = os.path.join(path, BASE_FILE)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
        candidates += [info.get("base"), os.path.normpath(os.path.join(path, info.get("base_relative") or ""))]
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        recorded = json.load(f).get("base_model_name_or_path")
    candidates.append(recorded)
    for c in candidates:
        if c and os.path.isdir(c):
            return c
    if recorded and not os.path.isabs(recorded) and not recorded.startswith("."):
        return recorded  # a hub id: from_pretrained resolves it (cache, or the network when allowed)
    raise ConfigError(f"{path} is a LoRA adapter whose base model is gone (looked for {', '.join(map(str, filter(None, candidates)))}); "
                      f"put the base model back, or set base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)}")


def root_model(path: str) -> str:
    """The first full-model folder down a chain of adapters (a LoRA stage trained on a LoRA stage's final/)."""
    seen = set()
    while is_adapter_dir(path):
        if path in seen:
            raise ConfigError(f"adapter folders refer to each other in a loop at {path}")
        seen.add(path)
        path = adapter_base(path)
    return path


def _adapter_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ConfigError(f"{path} has {ADAPTER_CONFIG} but no adapter_model.safetensors; the adapter is incomplete")
    return load_file(file)


def load_adapter_model(path: str, model_cfg, device: torch.device, trainable: bool = False):
    """The model of adapter folder ``path``: its base (itself merged, when it is an adapter) with this adapter on top,
    unmerged (``disable_adapter()`` then gives the base)."""
    from peft import PeftModel

    from .models import load_model

    base = load_model(adapter_base(path), model_cfg, device)
    model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    return model.to(device)


def load_merged(path: str, model_cfg, device: torch.device):
    """Adapter folder → a plain transformers model with W + s·BA merged in (peft ``merge_and_unload``), every weight
    trainable as after ``from_pretrained``."""
    return load_adapter_model(path, model_cfg, device).merge_and_unload().requires_grad_(True)


# ------------------------------------------------------------------------------------------------ validation
def _adaptable(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D))


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)  # peft's rule for a list of target names


def _tied_modules(model) -> list[str]:
    """Names of the input embedding and LM head when they share one weight (tie_word_embeddings)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is not out.weight:
        return []
    return [n for n, m in model.named_modules() if m is inp or m is out]


def lora_config(cfg, model):
    """peft ``LoraConfig`` for ``cfg`` (align's ``PeftConfig``), after checking it against ``model``'s modules.

    Errors (ConfigError, before training): a target or modules_to_save name that matches no module (naming the
    module names that exist), a target that is not a Linear / Embedding layer, and LoRA on a tied embedding / LM
    head (the merged model could not stay tied)."""
    from peft import LoraConfig

    names = {n: m for n, m in model.named_modules() if n}
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in names.items() if _adaptable(m)})
    available = f"the model's adaptable modules are: {', '.join(adaptable)}"

    def unknown(key: str, field: str) -> ConfigError:
        close = difflib.get_close_matches(key, adaptable, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"peft.{field}: {key!r} matches no module of {type(model).__name__}{hint}; "
                           f"{available}")

    targets = cfg.target_modules
    if isinstance(targets, list):
        matched = []
        for key in targets:
            hits = [n for n in names if _matches(n, key)]
            if not hits:
                raise unknown(key, "target_modules")
            bad = [n for n in hits if not _adaptable(names[n])]
            if bad:
                raise ConfigError(f"peft.target_modules: {key!r} matches {bad[0]} ({type(names[bad[0]]).__name__}), "
                                  f"which LoRA cannot adapt; target Linear or Embedding layers: {available}")
            matched += hits
    elif targets == "all-linear":
        out = model.get_output_embeddings()
        matched = [n for n, m in names.items() if isinstance(m, torch.nn.Linear) and m is not out]
    else:
        matched = [n for n in names if re.fullmatch(targets, n) and _adaptable(names[n])]
        if not matched:
            raise ConfigError(f"peft.target_modules: the regex {targets!r} matches no Linear or Embedding module "
                              f"(it must match full names such as {next(iter(n for n in names if _adaptable(names[n])))!r}); "
                              f"{available}")
    for key in cfg.exclude_modules:
        if not any(_matches(n, key) for n in names):
            raise unknown(key, "exclude_modules")
    matched = [n for n in matched if not any(_matches(n, k) for k in cfg.exclude_modules)]
    if not matched:
        raise ConfigError("peft: exclude_modules leaves no module to adapt")
    for key in cfg.modules_to_save:
        if not any(_matches(n, key) for n in names):
            raise unknown(key, "modules_to_save")
    tied = _tied_modules(model)
    adapted_tied = [n for n in matched if n in tied]
    if adapted_tied:
        raise ConfigError(
            f"peft.target_modules adapts {adapted_tied[0]}, but this model ties its input embedding and LM head "
            f"({' = '.join(tied)}): a LoRA on one of them would untie the merged model, which neither a tied "
            "checkpoint nor vLLM's tied model can hold. Leave them out (\"all-linear\" does), or train them in full "
            f"with peft.modules_to_save: [{tied[-1].rsplit('.', 1)[-1]}] (they stay tied)")
    saved_tied = [k for k in cfg.modules_to_save if any(_matches(n, k) for n in tied)]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=list(cfg.exclude_modules) or None, modules_to_save=list(cfg.modules_to_save) or None,
        ensure_weight_tying=bool(saved_tied), bias="none", task_type="CAUSAL_LM")


# -------------------------------------------------------------------------------------------- the policy model
def attach(model, cfg, base_path: str, adapter_path: str | None = None):
    """``model`` with fresh LoRA adapters (``cfg``: align's PeftConfig), or with the adapter saved in
    ``adapter_path`` (a checkpoint's model/ or a finished run's final/, loaded exactly into the same structure)."""
    import warnings

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = lora_config(cfg, model)
    with warnings.catch_warnings():  # peft's tied-weights notice: lora_config already refused the untying cases
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        peft_model = get_peft_model(model, config)
    # the folder this run started from (an adapter folder when it was a LoRA stage), not the merged root peft records
    config.base_model_name_or_path = os.path.abspath(base_path) if os.path.exists(base_path) else base_path
    if adapter_path is not None:
        state = _adapter_state(adapter_path)
        expected = set(get_peft_model_state_dict(peft_model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(f"{adapter_path}: the saved adapter does not fit the `peft:` settings of this config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the settings it was "
                              "trained with, or start a new run_dir")
        mine = get_peft_model_state_dict(peft_model)
        for k, v in state.items():
            if tuple(v.shape) != tuple(mine[k].shape):
                raise ConfigError(f"{adapter_path}: adapter tensor {k} has shape {tuple(v.shape)}, this config's "
                                  f"has {tuple(mine[k].shape)} (peft.r changed?); resume with the same settings")
        set_peft_model_state_dict(peft_model, state)
    return peft_model


def load_policy(weights: str, base: str, run_cfg, device: torch.device):
    """The model to train: full weights from ``weights`` (no ``peft:``), or ``base`` (merged, when it is itself an
    adapter) with LoRA adapters — fresh, or the ones saved in ``weights`` when that is an adapter folder."""
    from .models import load_model

    if run_cfg.peft is None:
        if weights != base and is_adapter_dir(weights):
            raise ConfigError(f"{weights} holds LoRA adapters, but this config has no `peft:` section; resume with the "
                              "peft settings it was trained with, or start a new run_dir")
        return load_model(weights, run_cfg.model, device)
    model = load_model(base, run_cfg.model, device)
    adapter = weights if weights != base and is_adapter_dir(weights) else None
    if weights != base and adapter is None:
        raise ConfigError(f"{weights} holds full weights, but this run trains LoRA adapters (peft:); it was started "
                          "without `peft:` — resume it with the same settings, or start a new run_dir")
    model = attach(model, run_cfg.peft, base, adapter)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %.3fM trainable of %.2fM parameters (%.2f%%)", run_cfg.peft.r,
             run_cfg.peft.alpha, run_cfg.peft.target_modules, trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def engine_start(weights: str, base: str) -> tuple[str, bool]:
    """(folder a generation engine can load, whether the policy's merged weights must be pushed right after) for a
    LoRA run whose adapter state is ``weights`` (== ``base`` at a fresh start: B = 0, so merged = base exactly)."""
    root = root_model(base)
    return root, weights != base or root != base


# ----------------------------------------------------------------------------------------- reference: adapters off
class _Off:
    """Calls ``module`` with the policy's adapters disabled."""

    def __init__(self, view: "AdapterDisabled", module):
        self.view, self.module = view, module

    def __call__(self, *args, **kwargs):
        with self.view.disabled():
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


class AdapterDisabled:
    """The reference policy of a LoRA run: the policy's own modules with every adapter switched off (peft
    ``disable_adapter()``), i.e. the frozen base model, at no extra memory.

    It offers what ``align/head.py`` uses (``get_decoder``, ``get_output_embeddings``, ``config``, ``parameters``,
    ``eval``/``train``), so the trainer's generic reference path (``ref_logprobs``, ``ref_model`` KL, the precompute
    pass) runs it like any frozen model. Backends route it through the policy's own engine (``adapter_host``)."""

    def __init__(self, policy):
        if not is_peft(policy):
            raise TypeError("AdapterDisabled needs a peft model")
        self.adapter_host = policy
        self.config = policy.config

    def disabled(self):
        return self.adapter_host.disable_adapter()

    def get_decoder(self):
        return _Off(self, self.adapter_host.get_decoder())

    def get_output_embeddings(self):
        head = self.adapter_host.get_output_embeddings()
        if not any(isinstance(m, _adapter_layer_types()) for m in head.modules()):
            return head  # the LM head carries no adapter (the usual case): call it as it is
        return _Off(self, head)

    def parameters(self):
        return self.adapter_host.parameters()

    @property
    def training(self) -> bool:
        return self.adapter_host.training

    def eval(self):
        self.adapter_host.eval()
        return self

    def train(self, mode: bool = True):
        self.adapter_host.train(mode)
        return self


def _adapter_layer_types() -> tuple:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    return (LoraLayer, ModulesToSaveWrapper)


def reference_view(model):
    """The reference policy of ``model``: :class:`AdapterDisabled` for a LoRA policy, else None (load a copy)."""
    return AdapterDisabled(model) if is_peft(model) else None


# --------------------------------------------------------------------------------------- merged weights, streamed
def _unit(key: str) -> str:
    """The module a state_dict key belongs to; for adapter-wrapped modules the wrapper (all its pieces together)."""
    cut = min((key.find(m) for m in _ADAPTER_MARKERS if m in key), default=-1)
    return key[:cut] if cut >= 0 else key.rpartition(".")[0]


def merged_weights(model, gather: Callable[[list[torch.Tensor]], object] | None = None,
                   copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the merged model in the *base* model's ``state_dict`` naming and order (tied weights
    under both names): for a LoRA layer ``W + s·B A`` (peft's ``get_delta_weight``), for a ``modules_to_save`` module
    its trained copy, everything else as is.

    One module at a time: ``gather(tensors)`` is entered around each module's tensors (ZeRO-3:
    ``GatheredParameters``), and only that module's merged weight is new memory — the model is never materialised
    twice. ``copy``: yield copies (needed when ``gather`` re-shards the parameters on exit)."""
    inner = model.get_base_model()
    adapter = model.active_adapter
    units: OrderedDict[str, list[tuple[str, torch.Tensor]]] = OrderedDict()
    for key, tensor in inner.state_dict(keep_vars=True).items():
        units.setdefault(_unit(key), []).append((key, tensor))
    for prefix, items in units.items():
        ctx = gather([t for _, t in items]) if gather is not None else nullcontext()
        with ctx, torch.no_grad():
            for key, tensor in items:
                if ".lora_" in key or ".original_module." in key:
                    continue
                name = key
                if ".modules_to_save." in key:
                    head, rest = key.split(".modules_to_save.", 1)
                    name = f"{head}.{rest.split('.', 1)[1]}"  # drop the adapter name
                elif ".base_layer." in key:
                    head, rest = key.split(".base_layer.", 1)
                    name = f"{head}.{rest}"
                    if rest == "weight":
                        layer = inner.get_submodule(head)
                        delta = layer.get_delta_weight(adapter)
                        yield name, (tensor + delta.to(tensor.dtype)).detach()
                        continue
                yield name, tensor.detach().clone() if copy else tensor.detach()


def hf_weights(model):
    """Full tensors under Hugging Face ``state_dict`` names: the merged stream of a LoRA policy, else the state dict."""
    if is_peft(model):
        return merged_weights(model)
    return model.state_dict().items()


# ------------------------------------------------------------------------------------------------ saving
def save_adapter(model, path: str, tokenizer=None, state_dict: dict | None = None, is_main: bool = True) -> None:
    """peft's adapter folder (``adapter_config.json`` naming the base by absolute path, ``adapter_model.safetensors``)
    + ``align_lora.json`` (the base's path, also relative to the folder) + the tokenizer. ``state_dict``: the
    policy's trainable tensors when the caller gathered them (ZeRO-3); peft picks the adapter's out of it."""
    if not is_main:
        return
    model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    base = model.peft_config[model.active_adapter].base_model_name_or_path
    info = {"base": base}
    if base and os.path.exists(base):
        info["base_relative"] = os.path.relpath(base, os.path.abspath(path))
    with open(os.path.join(path, BASE_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def gathered_trainable_state(model, gather: Callable[[list[torch.Tensor]], object]) -> dict[str, torch.Tensor]:
    """The policy's trainable tensors (its ``state_dict`` naming), each gathered whole (ZeRO-3) and copied to the CPU."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gather(trainable):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()
                if v.requires_grad}
