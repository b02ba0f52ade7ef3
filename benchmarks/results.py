"""The shared tail of the benchmark scripts: one row appended to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load_average() -> str:
    try:
        return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min) at the end"
    except OSError:
        return "load average unknown"


def append_row(script: str, argv, text: str, note: str = "") -> None:
    """| date | machine; load; note | the command that produced it | text | → benchmarks/RESULTS.md"""
    from rollout_throughput import machine

    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    args = list(argv if argv is not None else sys.argv[1:])
    cmd = env + shlex.join(["python", f"benchmarks/{script}"] + args)
    where = f"{machine()}; {load_average()}" + (f"; {note}" if note else "")
    with open(os.path.join(HERE, "RESULTS.md"), "a", encoding="utf-8") as f:
        f.write(f"| {datetime.date.today().isoformat()} | {where} | `{cmd}` | {text} |\n")
    print("appended to benchmarks/RESULTS.md")
