"""Tasks and data adapters: the bundled arithmetic task, and adapters that write rows of our data formats from
installed packages (``align data reasoning-gym``, ``align data champ``)."""

from __future__ import annotations

import json
import os


def write_jsonl(rows: list[dict], path: str) -> str:
    """Write ``rows`` as JSON lines, atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def add_data_parser(sub) -> None:
    """``align data ADAPTER ...``: one sub-command per adapter."""
    from . import champ, reasoning_gym

    p = sub.add_parser("data", help="write a dataset from an installed package as JSONL rows (reasoning-gym, CHAMP)")
    data_sub = p.add_subparsers(dest="adapter", required=True)
    reasoning_gym.add_parser(data_sub)
    champ.add_parser(data_sub)
