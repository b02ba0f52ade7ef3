"""The shared tail of the benchmark scripts: one row appended to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


HEADER = ("# Benchmark results\n\nOne row per run, appended by the scripts in this folder. Ratios are measured side by "
          "side in one run.\n\n| date | machine | command | result |\n|---|---|---|---|\n")


def machine() -> str:
    """CPU model, cores, memory and GPU of this machine, for the results row."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = (f", GPU {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}" if torch.cuda.is_available()
           else ", no GPU")
    return f"{cpu}, {cores} cores, {mem:.0f} GiB{gpu}"


def load_average() -> str:
    try:
        return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min) at the end"
    except OSError:
        return "load average unknown"


def append_row(script: str, argv, text: str, note: str = "") -> None:
    """| date | machine; load; note | the command that produced it | text | → benchmarks/RESULTS.md"""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    args = list(argv if argv is not None else sys.argv[1:])
    cmd = env + shlex.join(["python", f"benchmarks/{script}"] + args)
    where = f"{machine()}; {load_average()}" + (f"; {note}" if note else "")
    path = os.path.join(HERE, "RESULTS.md")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(HEADER)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"| {datetime.date.today().isoformat()} | {where} | `{cmd}` | {text} |\n")
    print("appended to benchmarks/RESULTS.md")
