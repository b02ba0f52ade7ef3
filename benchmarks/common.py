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


def record(script: str, argv, result: str, note: str = "", results: dict | None = None) -> None:
    """One row in benchmarks/RESULTS.md through the shared writer (``benchmarks/results.py``), with the range of the
    1-minute load average seen during the alternating runs (``results`` from ``alternate``) in the machine column."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # results.py imports its sibling rollout_throughput.py by its bare name
    from results import append_row

    loads = [r["load"] for runs in (results or {}).values() for r in runs]
    during = f"load average {min(loads):.1f}–{max(loads):.1f} during the runs" if loads else ""
    append_row(script, argv, result, "; ".join(x for x in (during, note) if x))


def side_by_side_parser(doc: str, *, steps: int, lr: float, batch: int | None = None, batch_help: str = "",
                        text_rows: bool = False):
    """The options every align-vs-TRL script shares: the model (``--model``, or the random Llama's shape), the run
    (``--warmup``, ``--steps``, ``--repeats``, ``--lr``, ``--dtype``, ``--seed``), the record (``--max-load``,
    ``--note``, ``--no-record``), with ``batch`` the micro-batch options and with ``text_rows`` the lengths of the
    prompt/completion rows; a script adds its own after."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default=None, help="'smollm2' (SmolLM2-135M-Instruct, align/prepared.py) or a model "
                   "folder instead of the random Llama; the workload's words are then tokenized by its tokenizer")
    p.add_argument("--vocab", type=int, default=32768, help="random Llama: vocabulary (word-level tokenizer)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--intermediate", type=int, default=1536)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch, help=batch_help)
        p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    if text_rows:
        p.add_argument("--max-length", type=int, default=1024)
        p.add_argument("--prompt-median", type=float, default=64, help="in words (one token each in the random Llama)")
        p.add_argument("--completion-median", type=float, default=96)
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before timing")
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=0.0, help="wait until the 1-min load average stays below this "
                   "for a minute before measuring (0: do not wait)")
    p.add_argument("--note", default="")
    p.add_argument("--no-record", action="store_true")
    return p


def setup_model(args, prefix: str, max_positions: int = 2048) -> tuple[str, str, str]:
    """Quiet datasets, set torch's threads from OMP_NUM_THREADS, make a temp root and the model: the random Llama of
    ``args``' shape saved there, or ``args.model`` resolved (``smollm2`` → its converted folder). Returns (root,
    model folder, a phrase naming the model and its parameter count)."""
    import tempfile

    import datasets
    import torch

    from benchmarks import workload

    datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    root = tempfile.mkdtemp(prefix=prefix)
    if args.model is None:
        path = os.path.join(root, "model")
        n = workload.save_model(path, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                intermediate=args.intermediate, max_positions=max_positions, seed=args.seed)
        return root, path, (f"{n / 1e6:.1f}M-param random Llama (hidden {args.hidden}, {args.layers} layers, "
                               f"head_dim 64, vocab {args.vocab}, word-level tokenizer)")
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.prepared import resolve_model

    path = resolve_model(args.model) or args.model
    n = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(path).parameters())
    vocab = AutoConfig.from_pretrained(path).vocab_size
    return root, path, f"{args.model} ({n / 1e6:.1f}M params, vocab {vocab}, its own tokenizer)"
