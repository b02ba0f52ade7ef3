"""Find losses by name: ``@register("dpo")`` inside the library, ``"my_pkg.my_module:MyLoss"`` from user code.

User code is imported only when a config names it explicitly with the ``module:Class`` form.
"""

from __future__ import annotations

import difflib
import importlib

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
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
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
