"""Compare the SFT family — sft, dft, asft, psft — on the quickstart task with the same data, seed, initial model and
budget, and write one table and one figure.

Run from the repository root (CPU; the default run took about 11 minutes on 2 CPU cores shared with other jobs):

    OMP_NUM_THREADS=1 python examples/compare_sft.py
    OMP_NUM_THREADS=1 python examples/compare_sft.py --base-steps 300 --steps 150   # from a shared SFT base model
    OMP_NUM_THREADS=1 python examples/compare_sft.py --losses sft,asft,sft_kl --set loss.kl_weight=0.05

On a GPU machine the same command uses the GPU (`backend.device: auto`); point `--config` at your own run config to
compare the losses on your model and data (it must have `eval.prompts` with answers, or give `--answers`).

What it does: (1) builds the quickstart's random tiny model once (OUT/init-model), or with `--base-steps N` first
trains it with plain SFT for N steps into a shared "base model" (OUT/base/), a stand-in for the pretrained model the
papers start from; (2) trains each loss from that same model for `--steps` (300, half the quickstart's budget, so
no loss saturates); (3) measures each result on the held-out additions. Writes OUT/compare.md (the table),
OUT/compare.png (held-out accuracy, drift, and the training NLL curves), OUT/results.json, and an ordinary run
directory per loss, OUT/<loss>/ (metrics.jsonl, final/, samples/).

What is the same for every loss: the initial weights, the training rows and their seeded order, the number of
optimizer steps, the examples per step (train.batch_size), the learning-rate schedule and the evaluation. psft takes
its 8 optimizer steps per old-policy snapshot out of the same budget (an experience batch is 8 × batch_size rows).
Every loss uses its own defaults from `align losses` (asft: λ = 0.1, reference = the base model).

Columns:
  accuracy  held-out exact match, greedy decoding (eval.prompts of the config: 200 additions never trained on)
  drift     mean per-token KL(π_θ ‖ π_init) from the shared initial (base) model, exact over the vocabulary,
            teacher-forced on the held-out reference answers (every answer token and the end-of-turn token; the
            same contexts for every model; align/drift.py). 0 for the initial model.
  NLL       mean per-token −log π_θ of the same held-out answer tokens

How it differs from the papers: they fine-tune pretrained 1.5B–8B models on math / medical data for one epoch and
score benchmarks; here a 2.4M-parameter random model learns two-digit addition from scratch, so "drift from the
initial model" mostly measures how far from its near-uniform start the model has moved (how confident it became),
and ASFT's anchor pulls towards that near-uniform distribution. `--base-steps` or `--init PATH` start from a model
that already knows something.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from align.config import pipeline_from_dict  # noqa: E402
from align.configio import apply_override, load_yaml, parse_override  # noqa: E402
from align.data import Tokenizer, read_rows  # noqa: E402
from align.drift import held_out_drift  # noqa: E402
from align.metrics import read_metrics  # noqa: E402
from align.models import load_model, load_tokenizer, materialize_model, resolve_device  # noqa: E402
from align.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="examples/quickstart.yaml", help="run config shared by every loss")
    p.add_argument("--losses", default="sft,dft,asft,psft", help="comma-separated registered losses to compare")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per loss (the quickstart takes 600)")
    p.add_argument("--out", default="runs/compare_sft", help="output folder (its per-loss runs are replaced)")
    p.add_argument("--base-steps", type=int, default=0,
                   help="plain-SFT steps that first make a shared initial model (0: the config's model, i.e. the\n"
                        "quickstart's random init)")
    p.add_argument("--init", default=None, help="start from this model folder instead of the config's")
    p.add_argument("--answers", default=None, help="held-out prompt+answer file for drift/NLL (default eval.prompts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run, e.g. train.lr=5e-4 or loss.kl_weight=0.05")
    return p.parse_args(argv)


def held_out_examples(path, tokenizer, data_cfg):
    """prompt + answer rows → prompt/completion examples (the answer as the assistant turn), for teacher forcing."""
    rows, source = read_rows(path)
    tk = Tokenizer(tokenizer, data_cfg, source)
    out = []
    for i, row in enumerate(rows):
        if "answer" not in row:
            raise SystemExit(f"{source}, row {i}: no 'answer' field; drift is measured on prompt+answer rows")
        chat = isinstance(row["prompt"], list)
        completion = [{"role": "assistant", "content": str(row["answer"])}] if chat else str(row["answer"])
        ex = tk.example({"prompt": row["prompt"], "completion": completion}, i, "prompt_completion")
        if ex is not None:
            out.append(ex)
    return out


def run_one(base: dict, loss_name: str, init_path: str, out: str, steps: int, overrides: list[str], first: bool,
            run_name: str | None = None):
    cfg = copy.deepcopy(base)
    cfg["run_dir"] = os.path.join(out, run_name or loss_name)
    cfg["model"] = {**cfg.get("model", {}), "name": init_path}
    loss_cfg = {"name": loss_name}
    cfg["loss"] = loss_cfg
    cfg["train"] = {**cfg.get("train", {}), "steps": steps,
                    "warmup_steps": max(1, round(0.05 * steps)), "save_every": 0}
    cfg["eval"] = {**cfg.get("eval", {}), "before": first, "every": 0}
    cfg["log"] = {**cfg.get("log", {}), "progress": False, "tensorboard": False, "plots": False}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "loss" and len(keys) == 2:
            # an option meant for some losses only (e.g. kl_weight) goes to the losses that have it
            from losses import get_loss_class
            from losses.base import options_fields

            if keys[1] not in {f.name for f in options_fields(get_loss_class(loss_name).Options)}:
                continue
        apply_override(cfg, keys, value)
    shutil.rmtree(cfg["run_dir"], ignore_errors=True)
    pipe = pipeline_from_dict(cfg)
    trainer = Trainer(pipe.stages[0].config, pipe.run_dir)
    t0 = time.time()
    summary = trainer.fit()
    return trainer, summary, time.time() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    base = load_yaml(args.config)
    base.pop("stages", None)
    base.pop("run_dir", None)
    os.makedirs(args.out, exist_ok=True)
    checked = pipeline_from_dict({**base, "run_dir": args.out}).stages[0].config  # errors now, before training
    if not (args.answers or checked.eval.prompts):
        raise SystemExit(f"{args.config} has no eval.prompts; give --answers FILE with prompt+answer rows")

    if not args.init:
        shutil.rmtree(os.path.join(args.out, "init-model"), ignore_errors=True)  # rebuilt from this config's shape
    init_path = args.init or materialize_model(checked.model, args.out, checked.seed)
    initial_accuracy, base_seconds = None, 0.0
    if args.base_steps:  # the shared initial model: plain SFT for base_steps, then every loss starts from it
        print(f"[compare] making the shared initial model: sft for {args.base_steps} steps ...", flush=True)
        _, summary, base_seconds = run_one(base, "sft", init_path, args.out, args.base_steps, args.set, first=False,
                                           run_name="base")
        init_path, initial_accuracy = summary["final_model"], summary["after"]["accuracy"]
    device = resolve_device(checked.backend.device)
    tokenizer = load_tokenizer(checked.model.tokenizer or init_path)
    init = load_model(init_path, checked.model, device).eval()
    answers = held_out_examples(args.answers or checked.eval.prompts, tokenizer, checked.data)

    results = []
    base_drift = held_out_drift(init, init, answers, tokenizer.pad_token_id, chunk_tokens=checked.model.chunk_tokens)
    initial = {"loss": "initial model", "options": {}, "accuracy": initial_accuracy, "drift_kl": 0.0,
               "nll": base_drift["nll"], "seconds": base_seconds}
    for i, name in enumerate(names):
        print(f"[compare] training {name} ({args.steps} steps) ...", flush=True)
        trainer, summary, seconds = run_one(base, name, init_path, args.out, args.steps, args.set,
                                            first=(i == 0 and initial_accuracy is None))
        if "before" in summary:
            initial["accuracy"] = summary["before"].get("accuracy")
        final = load_model(summary["final_model"], checked.model, device).eval()
        drift = held_out_drift(final, init, answers, tokenizer.pad_token_id, chunk_tokens=checked.model.chunk_tokens)
        curve = [(r["step"], r["nll"]) for r in read_metrics(trainer.run_dir)
                 if r.get("kind") == "train" and "nll" in r]
        options = dataclasses.asdict(trainer.loss.opt) if dataclasses.is_dataclass(trainer.loss.opt) else {}
        results.append({"loss": name, "options": options, "accuracy": summary["after"]["accuracy"],
                        "drift_kl": drift["kl"], "nll": drift["nll"], "seconds": seconds, "train_nll": curve})
        print(f"[compare] {name}: accuracy {results[-1]['accuracy']:.3f}  drift {drift['kl']:.4f}  "
              f"held-out NLL {drift['nll']:.4f}  ({seconds:.0f} s)", flush=True)

    table = markdown_table([initial] + results, args, checked)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"initial": initial, "runs": results, "steps": args.steps, "base_steps": args.base_steps,
                   "overrides": args.set}, f, indent=2)
    png = plot(results, os.path.join(args.out, "compare.png"), args.steps)
    print(table)
    print(f"[compare] wrote {os.path.join(args.out, 'compare.md')} and {png}")
    return 0


def markdown_table(rows, args, cfg) -> str:
    t = cfg.train
    lines = [
        f"SFT family on `{cfg.data.train}`: {args.steps} optimizer steps × {t.batch_size} examples, lr {t.lr}, "
        f"seed {cfg.seed}, every loss from the same initial model ("
        + (f"{args.base_steps} plain-SFT steps from " if args.base_steps else "")
        + (f"`{args.init}`" if args.init else "the config's model") + "); "
        f"held-out set `{args.answers or cfg.eval.prompts}`."
        + (f" Overrides: {' '.join(args.set)}." if args.set else ""),
        "",
        "| loss | options | held-out accuracy | drift KL(π_θ‖π_init) per token | held-out answer NLL | train time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        opts = ", ".join(f"{k} {v}" for k, v in r.get("options", {}).items() if k != "aggregation")
        lines.append(f"| {r['loss']} | {opts} | {acc} | {r['drift_kl']:.4f} | {r['nll']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results, path: str, steps: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["loss"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(names, [r["accuracy"] for r in results], color="tab:blue")
    axes[0].set_title("held-out exact match (greedy)")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [r["drift_kl"] for r in results], color="tab:orange")
    axes[1].set_title("drift: mean token KL(π_θ‖π_init)")
    for r in results:
        if r["train_nll"]:
            xs, ys = zip(*r["train_nll"])
            axes[2].plot(xs, ys, lw=1.2, label=r["loss"])
    axes[2].set_yscale("log")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_title("training NLL of the demonstrations")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"SFT family on the quickstart task, {steps} steps each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
