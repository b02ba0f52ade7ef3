"""DPO with LoRA vs. full fine-tuning on the same model: memory and step time, as ratios, one run.

    OMP_NUM_THREADS=1 python benchmarks/lora_vs_full.py          # CPU: a 27M-param random Llama, ~4 min
    python benchmarks/lora_vs_full.py --hidden 2048 --layers 16  # a GPU

Both runs go through align's own trainer (``align.trainer.Trainer``) with ``loss: dpo`` on the bundled arithmetic
preference pairs (``examples/data/arith/pairs.jsonl``), the same model, data order, batch and micro-batch sizes; they
differ only in the ``peft:`` section (LoRA r=16, alpha 32, all linear layers). Each run is its own process, so peak
RSS is its own; the runs alternate (full, LoRA, full, LoRA, ...) so a change in machine load hits both.

Measured per run:

- tensor bytes: parameters (all), gradients (the largest total of ``.grad`` tensors at an optimizer step), optimizer
  states (AdamW moments after training), and a reference model when one is kept in memory (``--reference
  model``: full fine-tuning keeps a frozen copy; LoRA's reference is its own base with adapters disabled, no copy).
  With the default ``--reference precompute`` neither keeps one: the reference log-probs are computed in one pass
  before training (full fine-tuning by the policy itself at step 0, LoRA by the disabled adapters);
- peak RSS of the process (``ru_maxrss``): everything, including Python, torch and the data;
- step time: median of the trainer's ``step_time`` over the steps after ``--warmup``.

Appends a row to benchmarks/RESULTS.md with the machine's load average (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
PAIRS = os.path.join(REPO, "examples", "data", "arith", "pairs.jsonl")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(args) -> dict:
    """One training run in this process; returns its measurements."""
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from align.config import pipeline_from_dict
    from align.trainer import Trainer

    cfg = {
        "run_dir": os.path.join(args.tmp, f"run-{args.worker}-{args.repeat}"),
        "seed": 0,
        "model": {"name": args.model, "dtype": args.dtype},
        "data": {"train": PAIRS, "limit": args.steps * args.batch_size, "max_length": 64, "shuffle": False},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                  "lr": 1e-5 if args.worker == "full" else 1e-4, "save_every": 0},
        "reference": {"precompute": args.reference == "precompute"},
        "log": {"progress": False, "tensorboard": False, "plots": False},
    }
    if args.worker == "lora":
        cfg["peft"] = {"r": args.r, "alpha": 2 * args.r, "target_modules": "all-linear"}
    pipe = pipeline_from_dict(cfg)
    t = Trainer(pipe.stages[0].config, pipe.run_dir)
    t.setup()
    grads = [0]
    step = t.backend.step

    def measured_step():  # the accumulated gradients exist here, just before the optimizer consumes them
        grads[0] = max(grads[0], _bytes(p.grad for p in t.model.parameters() if p.grad is not None))
        return step()

    t.backend.step = measured_step
    t.fit()
    ref = t.ref_model
    ref_bytes = _bytes(ref.parameters()) if ref is not None and not hasattr(ref, "adapter_host") else 0
    states = [v for s in t.backend.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    rows = [json.loads(line) for line in open(os.path.join(pipe.run_dir, "metrics.jsonl"))]
    times = [r["step_time"] for r in rows if r["kind"] == "train" and r["step"] > args.warmup]
    return {
        "params": _bytes(t.model.parameters()),
        "trainable": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in t.model.parameters()),
        "grads": grads[0],
        "optimizer": _bytes(states),
        "reference": ref_bytes,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_time": statistics.median(times),
        "loss_first": rows[0]["loss"] if rows else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step-time median")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--reference", choices=("precompute", "model"), default="precompute",
                   help="precompute: reference log-probs in one pass before training; model: a reference in memory")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per variant")
    p.add_argument("--note", default="")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--worker", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    from align.tiny import save_tiny

    tmp = tempfile.mkdtemp(prefix="lora-vs-full-")
    model = save_tiny(os.path.join(tmp, "model"), seed=0, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.hidden // 64, head_dim=64, intermediate_size=args.intermediate,
                      tie_word_embeddings=True)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    passthrough = ["--r", str(args.r), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
                   str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size), "--reference",
                   args.reference, "--dtype", args.dtype, "--model", model, "--tmp", tmp]
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for r in range(args.repeats):
        for variant in ("full", "lora"):
            out = os.path.join(tmp, f"{variant}-{r}.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant, "--repeat", str(r),
                            "--out", out, *passthrough], check=True, env=env, cwd=REPO)
            res = json.load(open(out))
            results[variant].append(res)
            print(f"  run {r + 1} {variant:<4} step {res['step_time']:.3f} s, peak RSS {res['peak_rss'] / 2**20:.0f} MiB",
                  flush=True)
    full, lora_ = results["full"][0], results["lora"][0]
    t_full = full["params"] + full["grads"] + full["optimizer"] + full["reference"]
    t_lora = lora_["params"] + lora_["grads"] + lora_["optimizer"] + lora_["reference"]
    step = {v: statistics.median(x["step_time"] for x in results[v]) for v in results}
    rss = {v: statistics.median(x["peak_rss"] for x in results[v]) for v in results}
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    runs = {v: " / ".join(f"{x['step_time']:.3f}" for x in results[v]) for v in results}
    settings = (f"{full['total_params'] / 1e6:.1f}M-param random Llama (hidden {args.hidden}, {args.layers} layers, "
                f"char vocab), {args.dtype}, dpo (β 0.1) on arith pairs, {args.steps} steps × {args.batch_size} pairs "
                f"(micro-batches of {args.micro_batch_size}), reference {args.reference}; LoRA r={args.r} all-linear "
                f"({lora_['trainable'] / 1e6:.2f}M trainable, {100 * lora_['trainable'] / lora_['total_params']:.1f}%); "
                f"median of {args.repeats} alternating runs, each its own process")
    summary = (f"params+grads+optimizer{'+reference' if args.reference == 'model' else ''} tensor bytes: full "
               f"{mib(t_full)} MiB (params {mib(full['params'])}, grads {mib(full['grads'])}, optimizer "
               f"{mib(full['optimizer'])}, reference {mib(full['reference'])}), LoRA {mib(t_lora)} MiB (params "
               f"{mib(lora_['params'])}, grads {mib(lora_['grads'])}, optimizer {mib(lora_['optimizer'])}, reference "
               f"{mib(lora_['reference'])}): **LoRA/full {t_lora / t_full:.2f}×**; peak RSS full {rss['full'] / 2**20:.0f} "
               f"MiB, LoRA {rss['lora'] / 2**20:.0f} MiB: **{rss['lora'] / rss['full']:.2f}×**; step time full "
               f"{step['full']:.3f} s, LoRA {step['lora']:.3f} s: **LoRA/full {step['lora'] / step['full']:.2f}×** "
               f"(runs: full {runs['full']}, LoRA {runs['lora']} s)")
    print(settings)
    print(summary)
    if not args.no_record:
        from results import append_row

        append_row("lora_vs_full.py", argv, f"{settings}. {summary}", args.note)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
