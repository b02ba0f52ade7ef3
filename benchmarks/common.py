"""What the side-by-side benchmark scripts share: alternation, medians, waiting for a quiet machine, the results row.

Speed claims in align are ratios measured side by side in one run (README "Benchmarks"). The scripts alternate the
two sides (A, B, A, B, ...) so that a change in machine load hits both, compare medians, and append one row to
``benchmarks/RESULTS.md`` through ``benchmarks/results.py``: date, machine (with the load average seen),
command, result.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_1min() -> float:
    """1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def wait_quiet(max_load: float, seconds: float = 60.0, give_up_after: float = 1800.0) -> float:
    """Block until the 1-minute load average stays below ``max_load`` for ``seconds`` (polled every 5 s), or
    ``give_up_after`` seconds pass. Returns the load average when it returns. ``max_load <= 0``: no waiting."""
    if max_load <= 0:
        return load_1min()
    start = time.time()
    quiet_since = None
    while time.time() - start < give_up_after:
        load = load_1min()
        if load < max_load:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= seconds:
                return load
        else:
            quiet_since = None
        time.sleep(5)
    print(f"machine did not get quiet (load {load_1min():.2f} ≥ {max_load}) within {give_up_after:.0f} s; "
          "measuring anyway", flush=True)
    return load_1min()


def alternate(sides: dict, repeats: int, log=print) -> dict[str, list]:
    """Run ``sides[name]()`` for every side, ``repeats`` times, alternating (A, B, A, B, ...). Each call returns a
    dict with at least ``value`` (the figure compared); returns {name: [result, ...]}."""
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(repeats):
        for name, run in sides.items():
            res = run()
            res["load"] = load_1min()
            out[name].append(res)
            log(f"  run {r + 1} {name:<6} {res['text']} (load {res['load']:.2f})")
    return out


def median(results: list[dict], key: str = "value") -> float:
    return statistics.median(r[key] for r in results)


def record(script: str, argv, result: str, note: str = "", loads: list[float] | None = None) -> None:
    """One row in benchmarks/RESULTS.md through the shared writer (``benchmarks/results.py``), with the range of the
    1-minute load average seen during the alternating runs in the machine column."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # results.py imports its sibling rollout_throughput.py by its bare name
    from results import append_row

    during = f"load average {min(loads):.1f}–{max(loads):.1f} during the runs" if loads else ""
    append_row(script, argv, result, "; ".join(x for x in (during, note) if x))
