"""Human-readable descriptions of registered losses and their options (for ``align losses``)."""

from __future__ import annotations

import dataclasses
import inspect
import re

_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^#]*?#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass's source → {name: comment}.

    Walks the base classes too, so an Options subclass that only changes defaults keeps its parent's comments
    (a comment in the subclass wins)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__ if isinstance(cls, type) else ():
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD.match(line)
            if m:
                out.setdefault(m.group(1), m.group(2).strip())
    return out


def describe_loss(cls) -> str:
    doc = (inspect.getdoc(cls) or "").splitlines()
    head = f"{cls.name}: {doc[0] if doc else ''}".rstrip()
    lines = [head]
    needs = sorted(cls.needs)
    if needs:
        lines.append(f"    needs: {', '.join(needs)}")
    if getattr(cls, "output", "logprobs") != "logprobs":  # trains another kind of model (losses.OUTPUTS)
        lines.append(f"    output: {cls.output} (trains AutoModelForSequenceClassification, num_labels=1)"
                     if cls.output == "scores" else f"    output: {cls.output}")
    fields = dataclasses.fields(cls.Options) if dataclasses.is_dataclass(cls.Options) else []
    comments = field_comments(cls.Options)
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        lines.append(f"    {f.name} = {default!r}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def describe_losses(name: str | None = None) -> str:
    import losses

    reg = losses.registered()
    if name:
        return describe_loss(losses.get_loss_class(name))
    return "\n\n".join(describe_loss(cls) for cls in reg.values())
