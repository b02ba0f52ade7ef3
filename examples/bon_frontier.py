"""Reward vs KL(π‖π_ref) of Best-of-N distillation and GRPO at an equal sampling budget, on the quickstart task.

Run from the repository root (CPU; the defaults took 12.0 minutes on 2 CPU cores shared with other jobs — see the
README section "Best-of-N distillation" for the measured table and examples/results/bon_frontier.png):

    OMP_NUM_THREADS=1 python examples/bon_frontier.py                       # writes runs/bon_frontier/
    OMP_NUM_THREADS=1 python examples/bon_frontier.py --init runs/bon_frontier/base/final   # reuse the SFT model
    OMP_NUM_THREADS=1 python examples/bon_frontier.py --methods rft,jbond --init runs/bon_frontier/base/final \
        --out runs/bon_frontier_extra
    OMP_NUM_THREADS=1 python examples/bon_frontier.py --out runs/bon_frontier --replot   # table + figure again

With a GPU (backend.device: auto) training, generation (transformers `generate`) and the measurements run on it;
only the CPU path has been run.

What it does:
  1. the reference π_ref: the quickstart model trained with plain SFT for --base-steps (390, as the RL quickstart:
     about half of the held-out additions right greedily, about a quarter when sampled), or --init PATH;
  2. the reference's own numbers on the 200 held-out additions: mean reward of one sample, and the Best-of-N reward
     (N = --n, the unbiased expected-max-of-N from --ref-samples samples per prompt; 0/1 exact match, so it is
     pass@N), with KL(π_BoN‖π_ref) from the §7.1 formula on each prompt's estimated P(correct);
  3. each method trained from π_ref on rollouts of the training prompts with the exact-match verifier, until it has
     generated --budget samples (policy samples + reference/anchor samples: BOND and vBoN spend k per distinct
     prompt once, J-BOND 2 anchor samples per prompt every step), checkpointed --points times on the way;
  4. every checkpoint measured on the held-out prompts: mean reward of one sample (temperature 1, --eval-samples per
     prompt) and KL(π_θ‖π_ref) per sequence on those samples, exact over the vocabulary at every token
     (`align.evalcmd.mean_kl_on_samples`).

Writes OUT/frontier.md (the table), OUT/frontier.png (reward vs KL, one curve per method), OUT/results.json and an
ordinary run directory per method (metrics.jsonl, samples/rollouts.jsonl, checkpoints/, final/).

Methods (all on the one trainer; configs in `methods()` below): bon_sft = `sft` + `rollout.select: best` (iterated
rejection-sampling SFT on the current policy's best of N; with 0/1 rewards a prompt whose N samples all fail still
trains on one wrong sample, as the Best-of-N distribution does); rft = `sft` + `select: verified` (only correct
samples, deduplicated: RFT / ReST); bond, vbon = their losses with N = --n; grpo = the `grpo`
preset (β = 0.04); jbond = `jbond` with one policy and two anchor samples per prompt; online_dpo = `dpo` on each
prompt's best/worst pair. Same initial model, prompts and order, seed, learning rate, optimizer and schedule.

How it differs from the papers: they distil Best-of-N of pretrained LLMs under learned reward models with
continuous scores; here the reward is a 0/1 verifier, so rewards tie almost always — the regime where the tie
correction of §7.1 matters and where vBoN's CDF and J-BOND's crude 2-sample reward are coarse.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from align.config import pipeline_from_dict  # noqa: E402
from align.configio import load_yaml  # noqa: E402
from align.data import load_prompts  # noqa: E402
from align.evalcmd import mean_kl_on_samples  # noqa: E402
from align.metrics import read_metrics  # noqa: E402
from align.models import load_model, load_tokenizer, resolve_device  # noqa: E402
from align.trainer import Trainer  # noqa: E402
from losses.bon import bon_kl, bon_kl_bound, expected_best_of_n  # noqa: E402
from rollouts.engine import SamplingParams  # noqa: E402
from rollouts.hf_engine import HFEngine  # noqa: E402


def methods(n: int, k: int) -> dict[str, dict]:
    """name → loss, rollout overrides (n: policy samples per prompt), reference samples: `ref_once` k per distinct
    prompt (a fixed, cached reference) or `ref_every_step` per prompt per step (J-BOND's moving anchor)."""
    return {
        "bon_sft": {"loss": {"name": "sft"}, "rollout": {"n": n, "select": "best"}},
        "rft": {"loss": {"name": "sft"}, "rollout": {"n": n, "select": "verified"}},
        "bond": {"loss": {"name": "bond", "bon_n": n, "reference_samples": k}, "rollout": {"n": n}, "ref_once": k},
        "vbon": {"loss": {"name": "vbon", "bon_n": n, "reference_samples": k}, "rollout": {"n": n}, "ref_once": k},
        "grpo": {"loss": {"name": "grpo"}, "rollout": {"n": n}},
        "jbond": {"loss": {"name": "jbond"}, "rollout": {"n": 1}, "ref_every_step": 2},
        "online_dpo": {"loss": {"name": "dpo", "beta": 0.1}, "rollout": {"n": n, "select": "best_worst"}},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="examples/quickstart.yaml", help="model shape, data, eval prompts")
    p.add_argument("--methods", default="bon_sft,bond,vbon,grpo", help="comma-separated, from: "
                   + ", ".join(methods(4, 8)))
    p.add_argument("--out", default="runs/bon_frontier")
    p.add_argument("--prompts", default="examples/data/arith/prompts.jsonl", help="training prompts (with `answer`)")
    p.add_argument("--base-steps", type=int, default=390, help="plain-SFT steps that make π_ref from the random init")
    p.add_argument("--init", default=None, help="use this model folder as π_ref instead of training one")
    p.add_argument("--n", type=int, default=4, help="N of Best-of-N: samples per prompt (bon_sft, bond, vbon, grpo)")
    p.add_argument("--budget", type=int, default=8192, help="generated samples per method (policy + reference)")
    p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per optimizer step")
    p.add_argument("--prompt-limit", type=int, default=256, help="training prompts used (BOND/vBoN sample k of each)")
    p.add_argument("--reference-samples", type=int, default=8, help="k: π_ref samples per prompt for bond / vbon")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--points", type=int, default=4, help="checkpoints measured per method (the last is final/)")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt for reward and KL")
    p.add_argument("--ref-samples", type=int, default=32, help="samples per held-out prompt for the reference's BoN")
    p.add_argument("--replot", action="store_true", help="only rewrite OUT/frontier.md and .png from OUT/results.json")
    return p.parse_args(argv)


def steps_for(spec: dict, args) -> int:
    """Optimizer steps that spend the budget: policy samples per step + the method's reference samples."""
    pps = args.prompts_per_step
    per_step = pps * spec["rollout"]["n"] + pps * spec.get("ref_every_step", 0)
    once = min(args.prompt_limit, args.budget) * spec.get("ref_once", 0)  # k per distinct prompt, at first sight
    return max(1, (args.budget - once) // per_step)


def base_config(args) -> dict:
    cfg = load_yaml(args.config)
    for key in ("stages", "run_dir", "loss", "train"):
        cfg.pop(key, None)
    cfg["log"] = {"progress": False, "tensorboard": False, "plots": False}
    return cfg


def train_base(args, cfg: dict) -> str:
    run = {**copy.deepcopy(cfg), "run_dir": os.path.join(args.out, "base"), "loss": "sft",
           "train": {"steps": args.base_steps, "batch_size": 64, "micro_batch_size": 64, "lr": 1e-3,
                     "warmup_steps": 30, "weight_decay": 0.01, "schedule": "cosine"},
           "eval": {**cfg.get("eval", {}), "before": False}}
    shutil.rmtree(run["run_dir"], ignore_errors=True)
    pipe = pipeline_from_dict(run)
    summary = Trainer(pipe.stages[0].config, pipe.run_dir).fit()
    return summary["final_model"]


def rl_config(args, cfg: dict, name: str, spec: dict, init: str, steps: int) -> dict:
    run = copy.deepcopy(cfg)
    run.update(run_dir=os.path.join(args.out, name), loss=spec["loss"])
    run["model"] = {**run.get("model", {}), "name": init}
    run.pop("eval", None)  # measured below on the checkpoints
    run["engine"] = {"name": "hf", "batch_size": 512}
    run["rollout"] = {"prompts": args.prompts, "limit": args.prompt_limit,
                      "temperature": 1.0, "max_new_tokens": 8, "rewards": [{"name": "exact_match"}], **spec["rollout"]}
    every = max(1, math.ceil(steps / args.points))
    run["train"] = {"steps": steps, "batch_size": args.prompts_per_step, "micro_batch_size": 512, "lr": args.lr,
                    "adam_betas": [0.9, 0.99], "warmup_steps": 5, "schedule": "constant", "weight_decay": 0.0,
                    "save_every": every, "keep_checkpoints": args.points + 1}
    return run


class Evaluator:
    """Held-out reward and KL(π‖π_ref) of a model, on samples it draws itself."""

    def __init__(self, cfg, ref_path: str, device):
        self.cfg = cfg
        self.device = device
        self.tokenizer = load_tokenizer(ref_path)
        self.ref = load_model(ref_path, cfg.model, device).eval()
        self.prompts = load_prompts(cfg.eval.prompts, self.tokenizer, cfg.data, cfg.eval.limit)

    def sample(self, model, n: int, temperature: float = 1.0, seed: int = 1234):
        engine = HFEngine(model, self.tokenizer, batch_size=1024)
        comps = engine.generate([p.prompt_ids for p in self.prompts],
                                SamplingParams(temperature=temperature, max_new_tokens=8, seed=seed), n=n)
        correct = [float(c.text.strip() == str(self.prompts[c.prompt_index].fields["answer"]).strip()) for c in comps]
        return comps, correct

    def measure(self, path: str, n: int) -> dict:
        model = load_model(path, self.cfg.model, self.device).eval()
        comps, correct = self.sample(model, n)
        _, greedy = self.sample(model, 1, temperature=0.0)
        kl = mean_kl_on_samples(model, self.ref, comps, self.cfg.model.chunk_tokens, per="sequence")
        return {"reward": sum(correct) / len(correct), "kl": kl, "greedy_accuracy": sum(greedy) / len(greedy),
                "length": sum(len(c.token_ids) for c in comps) / len(comps)}

    def reference(self, n_samples: int, N: int) -> dict:
        comps, correct = self.sample(self.ref, n_samples)
        _, greedy = self.sample(self.ref, 1, temperature=0.0)
        groups = [correct[i * n_samples:(i + 1) * n_samples] for i in range(len(self.prompts))]
        bon = sum(expected_best_of_n(g, N) for g in groups) / len(groups)
        kl_bon = 0.0  # KL(π_BoN‖π_ref) of each prompt, from its P(correct), §7.1 (ties: all correct / all wrong)
        for g in groups:
            p = sum(g) / len(g)
            if 0 < p < 1:
                kl_bon += bon_kl(torch.tensor([1 - p, p], dtype=torch.float64), torch.tensor([0.0, 1.0]), N)
        return {"reward": sum(correct) / len(correct), "bon_reward": bon, "bon_kl": kl_bon / len(groups),
                "greedy_accuracy": sum(greedy) / len(greedy), "samples": n_samples}


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    folder = os.path.join(run_dir, "checkpoints")
    out = [(int(d.split("-")[1]), os.path.join(folder, d, "model")) for d in sorted(os.listdir(folder))
           if d.startswith("step-")] if os.path.isdir(folder) else []
    return out + [(None, os.path.join(run_dir, "final"))]


def budget_used(run_dir: str) -> dict:
    """Samples actually generated, read back from the run: rollouts.jsonl lines and the reference-sample counter."""
    with open(os.path.join(run_dir, "samples", "rollouts.jsonl"), encoding="utf-8") as f:
        policy = sum(1 for _ in f)
    rows = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    reference = int(rows[-1].get("samples/reference", 0)) if rows else 0
    return {"policy": policy, "reference": reference, "total": policy + reference}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    table = methods(args.n, args.reference_samples)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(table)}")
    os.makedirs(args.out, exist_ok=True)
    if args.replot:  # the figure and table again, from the numbers a run saved
        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            saved = json.load(f)
        args = argparse.Namespace(**{**vars(parse_args([])), **saved["args"], "out": args.out})
        write_outputs(saved["runs"], saved["reference"], args, saved["base_seconds"], saved["seconds"])
        return 0
    cfg = base_config(args)
    checked = pipeline_from_dict({**cfg, "run_dir": args.out, "data": {**cfg["data"]}}).stages[0].config
    t_start = time.time()
    if args.init:
        ref_path, base_seconds = args.init, 0.0
    else:
        print(f"[frontier] π_ref: plain SFT for {args.base_steps} steps ...", flush=True)
        ref_path = train_base(args, cfg)
        base_seconds = time.time() - t_start
    device = resolve_device(checked.backend.device)
    evaluator = Evaluator(checked, ref_path, device)
    reference = evaluator.reference(args.ref_samples, args.n)
    print(f"[frontier] π_ref: reward {reference['reward']:.3f}, Best-of-{args.n} {reference['bon_reward']:.3f} "
          f"(KL {reference['bon_kl']:.3f})", flush=True)

    results = []
    for name in names:
        spec = table[name]
        steps = steps_for(spec, args)
        run = rl_config(args, cfg, name, spec, ref_path, steps)
        shutil.rmtree(run["run_dir"], ignore_errors=True)
        print(f"[frontier] {name}: {steps} steps ...", flush=True)
        pipe = pipeline_from_dict(run)
        t0 = time.time()
        Trainer(pipe.stages[0].config, pipe.run_dir).fit()
        seconds = time.time() - t0
        points = [{"step": 0, "reward": reference["reward"], "kl": 0.0}]
        for step, path in checkpoints(run["run_dir"]):
            m = evaluator.measure(path, args.eval_samples)
            points.append({"step": step if step is not None else steps, **m})
        results.append({"method": name, "loss": spec["loss"], "rollout": spec["rollout"], "steps": steps,
                        "budget": budget_used(run["run_dir"]), "seconds": seconds, "points": points})
        last = points[-1]
        print(f"[frontier] {name}: reward {last['reward']:.3f}, KL {last['kl']:.3f}, greedy "
              f"{last['greedy_accuracy']:.3f} ({seconds:.0f} s)", flush=True)

    total = time.time() - t_start
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"reference": reference, "runs": results, "args": vars(args), "seconds": total,
                   "base_seconds": base_seconds}, f, indent=2)
    write_outputs(results, reference, args, base_seconds, total)
    return 0


def write_outputs(results, reference, args, base_seconds, total) -> None:
    md = markdown(results, reference, args, base_seconds, total)
    with open(os.path.join(args.out, "frontier.md"), "w", encoding="utf-8") as f:
        f.write(md)
    png = plot(results, reference, args, os.path.join(args.out, "frontier.png"))
    print(md)
    print(f"[frontier] wrote {os.path.join(args.out, 'frontier.md')} and {png} ({total / 60:.1f} min)")


def markdown(results, reference, args, base_seconds, total) -> str:
    N = args.n
    lines = [
        f"π_ref: quickstart model after {args.base_steps if not args.init else '—'} SFT steps"
        + (f" ({args.init})" if args.init else "") + f"; training prompts: the first {args.prompt_limit} of "
        f"{args.prompts}, {args.prompts_per_step} per step, exact-match reward, temperature 1, "
        f"lr {args.lr}; budget {args.budget} generated samples per method; measured on the held-out prompts "
        f"of {args.config} ({args.eval_samples} samples each; reference: {args.ref_samples}).",
        "",
        "| policy | samples at inference | reward (1 sample) | KL(π‖π_ref) per sequence | greedy accuracy | steps "
        "| samples: policy + reference | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| π_ref | 1 | {reference['reward']:.3f} | 0 | {reference['greedy_accuracy']:.3f} | — | — | "
        f"{base_seconds:.0f} |",
        f"| Best-of-{N} of π_ref | {N} | {reference['bon_reward']:.3f} | {reference['bon_kl']:.3f} (bound "
        f"{bon_kl_bound(N):.3f}) | — | — | — | — |",
    ]
    for r in results:
        p = r["points"][-1]
        b = r["budget"]
        lines.append(f"| {r['method']} | 1 | {p['reward']:.3f} | {p['kl']:.3f} | {p['greedy_accuracy']:.3f} | "
                     f"{r['steps']} | {b['policy']} + {b['reference']} = {b['total']} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"Whole run: {total / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(results, reference, args, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in results:
        xs = [p["kl"] for p in r["points"]]
        ys = [p["reward"] for p in r["points"]]
        ax.plot(xs, ys, marker="o", ms=4, lw=1.4, label=f"{r['method']} ({r['steps']} steps)")
    N = args.n
    ax.axhline(reference["bon_reward"], color="k", ls="--", lw=1, label=f"Best-of-{N} of π_ref ({N} samples)")
    ax.plot([reference["bon_kl"]], [reference["bon_reward"]], marker="*", ms=13, color="k", ls="none")
    ax.axvline(bon_kl_bound(N), color="grey", ls=":", lw=1, label=f"log {N} − {N - 1}/{N}")
    ax.plot([0], [reference["reward"]], marker="s", color="grey", ls="none", label="π_ref")
    ax.set_xlabel("KL(π_θ ‖ π_ref) per sequence (nats, held-out samples)")
    ax.set_ylabel("mean exact match of one sample (T = 1)")
    ax.set_title(f"Equal budget: {args.budget} generated samples per method", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
