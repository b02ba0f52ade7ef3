"""Per-rank parameter + gradient + optimizer bytes under ZeRO stages 0–3, as ratios to stage 0, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py [--world 2] [--precision fp32|bf16] [--record] [--note TEXT]

Launches ``torchrun --nproc_per_node WORLD`` on itself (gloo on CPU, nccl on GPUs); each rank builds the same model,
runs two optimizer steps of SFT through align's DeepSpeed backend for each stage, and counts — after the second
step's backward, before its update, when gradients, parameters and optimizer states all exist — the bytes it holds
(``align/zero_memory.py``: tensors, each storage once). The DeepSpeed JSON is examples/ds_zero{2,3}.json ("auto"
bucket sizes from the model width); stage 1 uses the same "auto" bucket size, stage 0 DeepSpeed's defaults. ``--record`` appends a row to benchmarks/RESULTS.md.

ZeRO's memory model (Rajbhandari et al. 2020, §5) for W ranks, fp32 Adam: stage 1 divides optimizer states by W,
stage 2 also gradients, stage 3 also parameters. Fixed-size reduction buckets and padding to multiples of W come on
top; they are counted with the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
KEYS = ("params", "gradients", "optimizer_states", "master_weights")
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 768}


def config(root: str, stage: int, precision: str = "fp32") -> dict:
    from helpers import arith_rows, tiny_config, write_jsonl

    rows = write_jsonl(os.path.join(root, "train.jsonl"), arith_rows(64))
    backend = {"name": "deepspeed", "zero_stage": stage, "precision": precision}
    if stage in (2, 3):
        backend["deepspeed_config"] = os.path.join(REPO, "examples", f"ds_zero{stage}.json")
    elif stage == 1:  # the same bucket size as ds_zero2.json (DeepSpeed's default, 5e8 elements, would dominate)
        path = os.path.join(root, "ds_zero1.json")
        with open(path, "w") as f:
            json.dump({"zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}, f)
        backend["deepspeed_config"] = path
    return tiny_config(os.path.join(root, f"z{stage}-{precision}"), model={"tiny": MODEL}, data={"train": rows, "max_length": 48},
                       train={"steps": 2, "batch_size": 16, "micro_batch_size": 4, "lr": 1e-3}, backend=backend)


def worker(root: str, out: str, precision: str) -> None:
    import torch

    from align.collate import collate, plan_micro_batches
    from align.config import pipeline_from_dict
    from align.trainer import Trainer

    torch.set_num_threads(1)
    results = {}
    for stage in (0, 1, 2, 3):
        pipe = pipeline_from_dict(config(root, stage, precision))
        t = Trainer(pipe.stages[0].config, pipe.run_dir).setup()
        b = t.backend
        for step in range(2):
            batch, units = collate(t.source.next_batch(), t.tokenizer.pad_token_id)
            plan = plan_micro_batches(batch, units, 4)
            n_tokens = b.all_reduce_sum([float(batch.loss_mask.sum())])[0]
            for rows in plan:
                mb = batch.select(rows)
                _, lp, _ = b.forward(b.module, mb.input_ids, mb.attention_mask, mb.loss_mask, chunk_tokens=1024)
                b.backward(-(lp * mb.loss_mask).sum() / n_tokens)
            if step == 1:
                mem = b.memory_bytes()
            b.step()
        every = [None] * b.world_size
        torch.distributed.all_gather_object(every, mem)
        results[stage] = every
        from align.models import count_parameters

        results["n_params"] = count_parameters(t.model)[0]
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


def table(results: dict, world: int) -> tuple[str, str]:
    base = results["0"][0]
    base_total = sum(base[k] for k in KEYS)
    lines = [f"per-rank bytes with {world} ranks, {results['precision']} AdamW, {results['n_params'] / 1e6:.2f}M parameters "
             f"(ratio to stage 0; rank 0; ranks' totals differ by at most {100 * results['spread']:.1f}%)",
             f"{'stage':<6}" + "".join(f"{k:>20}" for k in KEYS) + f"{'total':>20}"]
    summary = []
    for stage in ("0", "1", "2", "3"):
        r = results[stage][0]
        total = sum(r[k] for k in KEYS)
        cells = "".join(f"{r[k] / 2**20:>10.2f} MiB {r[k] / max(base[k], 1):>5.2f}" if base[k] else
                        f"{r[k] / 2**20:>10.2f} MiB    - " for k in KEYS)
        lines.append(f"{stage:<6}{cells}{total / 2**20:>10.2f} MiB {total / base_total:>5.2f}")
        summary.append(f"stage {stage}: {total / base_total:.2f}")
    return "\n".join(lines), ", ".join(summary)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    p.add_argument("--note", default="", help="added to the machine column (e.g. 'shared machine')")
    p.add_argument("--worker", nargs=3, metavar=("ROOT", "OUT", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "results.json")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world),
               os.path.abspath(__file__), "--worker", root, out, args.precision]
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        with open(out) as f:
            results = json.load(f)
    spread = max(max(t) / min(t) - 1 for t in ([sum(r[k] for k in KEYS) for r in results[s]]
                                               for s in ("0", "1", "2", "3")))
    results["spread"] = spread  # largest difference between ranks' totals, as a fraction
    results["precision"] = args.precision
    text, summary = table(results, args.world)
    print(text)
    if args.record:
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        from results import append_row

        append_row("zero_memory.py", None,
                   f"per-rank params + grads + optimizer bytes as a ratio to stage 0 ({args.world} ranks, "
                   f"{args.precision}, {results['n_params'] / 1e6:.2f}M params; rank 0, other ranks within "
                   f"{100 * results['spread']:.1f}%): **{summary}**. " + "; ".join(
                       f"stage {s}: " + ", ".join(f"{k} {results[s][0][k] / max(results['0'][0][k], 1):.2f}"
                                                  for k in ("params", "gradients", "optimizer_states"))
                       + f", master {results[s][0]['master_weights'] / 2**20:.2f} MiB" for s in ("0", "1", "2", "3")),
                   args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
