"""What every benchmark script shares: the machine line, the command line, the load, the results row, alternation.

Speed claims in align are ratios measured side by side in one run (README "Benchmarks"). The scripts alternate the
two sides (A, B, A, B, ...) so that a change in machine load hits both, compare medians, and append one row to
``benchmarks/RESULTS.md``: date, machine (with the load average seen), command, result.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADER = ("# Benchmark results\n\nOne row per run, appended by the scripts in this folder. Ratios are measured side by "
          "side in one run.\n\n| date | machine | command | result |\n|---|---|---|---|\n")


def machine() -> str:
    """'CPU model, N cores, M GiB, GPU name (or no GPU)'."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {cores} cores, {mem:.0f} GiB{gpu}"


def load_average() -> float:
    """1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def wait_quiet(max_load: float, seconds: float = 60.0, give_up_after: float = 1800.0) -> float:
    """Block until the 1-minute load average stays below ``max_load`` for ``seconds`` (polled every 5 s), or
    ``give_up_after`` seconds pass. Returns the load average when it returns. ``max_load <= 0``: no waiting."""
    if max_load <= 0:
        return load_average()
    start = time.time()
    quiet_since = None
    while time.time() - start < give_up_after:
        load = load_average()
        if load < max_load:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= seconds:
                return load
        else:
            quiet_since = None
        time.sleep(5)
    print(f"machine did not get quiet (load {load_average():.2f} ≥ {max_load}) within {give_up_after:.0f} s; "
          "measuring anyway", flush=True)
    return load_average()


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run (with OMP_NUM_THREADS when it is set)."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    args = list(argv if argv is not None else sys.argv[1:])
    return env + shlex.join(["python", f"benchmarks/{script}"] + args)


def alternate(sides: dict, repeats: int, log=print) -> dict[str, list]:
    """Run ``sides[name]()`` for every side, ``repeats`` times, alternating (A, B, A, B, ...). Each call returns a
    dict with at least ``value`` (the figure compared); returns {name: [result, ...]}."""
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(repeats):
        for name, run in sides.items():
            res = run()
            res["load"] = load_average()
            out[name].append(res)
            log(f"  run {r + 1} {name:<6} {res['text']} (load {res['load']:.2f})")
    return out


def median(results: list[dict], key: str = "value") -> float:
    return statistics.median(r[key] for r in results)


def append_row(cmd: str, result: str, note: str = "", loads: list[float] | None = None) -> str:
    """Append a row to benchmarks/RESULTS.md; returns its path."""
    where = machine()
    if loads:
        where += f"; load average {min(loads):.1f}–{max(loads):.1f} during the runs"
    if note:
        where += f"; {note}"
    row = f"| {datetime.date.today().isoformat()} | {where} | `{cmd}` | {result} |\n"
    if not os.path.exists(RESULTS):
        with open(RESULTS, "w", encoding="utf-8") as f:
            f.write(HEADER)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(row)
    return RESULTS
