"""Find losses by name: ``@register("dpo")`` inside the library; from user code either
``"my_pkg.my_module:MyLoss"`` (an importable module) or ``"path/to/my_loss.py:MyLoss"`` (a file).

User code is imported only when a config names it explicitly in one of those ``module:Class`` forms.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys

from .base import Loss

_REGISTRY: dict[str, type[Loss]] = {}


def register(name: str):
    """Class decorator: make a Loss subclass available as ``loss: <name>`` in configs."""

    def deco(cls: type[Loss]) -> type[Loss]:
        if not (isinstance(cls, type) and issubclass(cls, Loss)):
            raise TypeError(f"@register({name!r}) must decorate a subclass of losses.Loss, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"loss name {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered() -> dict[str, type[Loss]]:
    """Name → class of every registered loss, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def get_loss_class(spec: str) -> type[Loss]:
    """``"dpo"`` → the registered class; ``"pkg.module:Class"`` → that class, imported now."""
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        try:
            module = load_module(module_name)
        except ImportError as e:
            raise ValueError(f"loss {spec!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from e
        cls = getattr(module, attr, None)
        if cls is None:
            raise ValueError(f"loss {spec!r}: module {module_name!r} has no attribute {attr!r}")
        if not (isinstance(cls, type) and issubclass(cls, Loss)):
            raise ValueError(f"loss {spec!r} is not a subclass of losses.Loss")
        if not cls.name:
            cls.name = spec
        return cls
    if spec not in _REGISTRY:
        close = difflib.get_close_matches(spec, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown loss {spec!r}{hint} Registered: {', '.join(sorted(_REGISTRY))}. "
            "A loss of your own is named as 'package.module:ClassName'."
        )
    return _REGISTRY[spec]


def load_module(name: str):
    """An importable module name, or a path to a ``.py`` file (loaded once, under a name derived from its path)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise ImportError(f"no such file {name!r}")
    key = "align_user_" + os.path.splitext(path)[0].strip(os.sep).replace(os.sep, "_").replace("-", "_").replace(".", "_")
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
