"""RL step time: align's ``grpo`` preset vs TRL ``GRPOTrainer``, same engine, group size and lengths, in one run.

    OMP_NUM_THREADS=1 python benchmarks/rl_step.py                       # CPU: transformers generate on both sides
    python benchmarks/rl_step.py --engine vllm --prompts 32 --n 8 --max-new-tokens 512   # a GPU: vLLM on both sides

Model as in ``sft_throughput.py`` (a random Llama with a word-level vocabulary, ``benchmarks/workload.py``). Each
optimizer step takes ``--prompts`` prompts (log-normal lengths), samples ``--n`` completions of each at temperature 1
with up to ``--max-new-tokens`` tokens, scores them with the same reward function (``workload.even_words``), and makes
one GRPO update (DeepSeekMath Eq. 3: group-normalised advantages, PPO clip 0.2, k3 KL to the initial policy with
β = 0.04, sequence mean of token means) in ``--grad-accum`` micro-batches. TRL: ``loss_type="grpo"``,
``beta=0.04``, ``num_generations=n``, ``steps_per_generation`` = grad-accum (one generation per optimizer step),
``use_vllm`` per ``--engine``.

The check before timing: both sides must compute the same first step from the same experience. align's first
experience batch (its prompts, completions and rewards) is handed to TRL, whose generation call returns those
completions; TRL then scores them, computes its reference log-probs and advantages, and takes its step; the loss and
gradient norm of that step must equal align's (relative 1e-4). The timed runs then sample freely on both sides.

The figure: seconds per optimizer step over ``--steps`` steps after ``--warmup``, split into
- generation: the engine's sampling (align ``rollout_time``; TRL's generation call);
- scoring: rewards, reference / old-policy log-probs and advantages (align ``reward_time`` + ``prepare_time``; TRL
  the rest of ``_generate_and_score_completions``);
- update: everything else in the step (forward, backward, optimizer, collation, logging).
Sides alternate for ``--repeats`` runs; medians are compared. Appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, workload  # noqa: E402
from benchmarks.common import median, record, setup_model, side_by_side_parser  # noqa: E402

PARTS = ("generation", "scoring", "update")


def align_config(args, model_path: str, prompts_path: str, root: str) -> dict:
    engine = {"name": args.engine}
    if args.engine == "vllm":
        engine["options"] = {"gpu_memory_utilization": 0.3} if _cuda() else {"kv_cache_memory_bytes": 1 << 30}
    return {
        "run_dir": harness.tmpdir(root, "align-"), "seed": args.seed, "resume": False,
        "model": {"name": model_path, "dtype": args.dtype, "attn_implementation": "sdpa"},
        "data": {"max_length": args.max_prompt + args.max_new_tokens},
        "loss": {"name": "grpo", "beta": args.beta},
        "rollout": {"prompts": prompts_path, "n": args.n, "temperature": 1.0, "max_new_tokens": args.max_new_tokens,
                    "rewards": [{"name": "benchmarks.workload:even_words"}], "shuffle": False},
        "engine": engine,
        "train": {"steps": args.warmup + args.steps, "batch_size": args.prompts,
                  "micro_batch_size": args.prompts * args.n // args.grad_accum, "lr": args.lr,
                  "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0},
        "log": {"progress": False, "tensorboard": False, "plots": False},
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def align_run(args, model_path: str, prompts_path: str, root: str, capture: list | None = None) -> dict:
    """A fresh align Trainer; ``capture``: append the first experience batch's examples to it."""

    def on_setup(trainer):
        if capture is None:
            return
        next_batch = trainer.source.next_batch

        def recorded(*a, **kw):
            examples = next_batch(*a, **kw)
            if not capture:
                capture.extend(examples)
            return examples

        trainer.source.next_batch = recorded

    steps = 1 if capture is not None else args.warmup + args.steps
    marks, trainer = harness.run_align(align_config(args, model_path, prompts_path, root), steps, on_setup=on_setup)
    for m in marks:
        x = m["metrics"]
        m["generation"] = x["rollout_time"]
        m["scoring"] = x["reward_time"] + x["prepare_time"]
        m["completion_length"] = x["completion_length"]
    harness.free(trainer)
    return _split(marks, 0 if capture is not None else args.warmup)


def trl_run(args, model_path: str, rows: list[dict], root: str, inject: list | None = None) -> dict:
    """A fresh TRL GRPOTrainer; ``inject``: align's first experience (examples), returned by TRL's generation call."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class Timed(GRPOTrainer):
        _gen_s = _gs_s = 0.0
        _lengths: list = []

        def _generate_single_turn(self, prompt_ids, *a, **kw):
            t0 = time.perf_counter()
            if inject is not None:
                completion_ids, logprobs = _injected(inject, prompt_ids), None
            else:
                completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *a, **kw)
            self._gen_s += time.perf_counter() - t0
            self._lengths = [len(c) for c in completion_ids]
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self._gs_s += time.perf_counter() - t0
            return out

        def step_extras(self):
            out = {"generation": self._gen_s, "scoring": self._gs_s - self._gen_s,
                   "completion_length": sum(self._lengths) / max(len(self._lengths), 1)}
            self._gen_s = self._gs_s = 0.0
            return out

    Trainer = harness.trl_trainer_class(Timed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    steps = 1 if inject is not None else args.warmup + args.steps
    vllm = {}
    if args.engine == "vllm":
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    cfg = GRPOConfig(output_dir=harness.tmpdir(root, "trl-"), use_cpu=not torch.cuda.is_available(), bf16=False,
                     per_device_train_batch_size=args.prompts * args.n // args.grad_accum,
                     gradient_accumulation_steps=args.grad_accum, num_generations=args.n,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     loss_type="grpo", beta=args.beta, use_bias_correction_kl=False, max_steps=steps,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                     seed=args.seed, shuffle_dataset=False, **vllm)
    trainer = Trainer(model=model, reward_funcs=workload.even_words, args=cfg, train_dataset=Dataset.from_list(rows),
                      processing_class=tok)
    trainer.train()
    out = _split(trainer.marks, 0 if inject is not None else args.warmup)
    harness.free(trainer, model)
    return out


def _injected(examples, prompt_ids: list[list[int]]) -> list[list[int]]:
    """align's completions for TRL's (repeated) prompts, in TRL's order; TRL's prompt ids must equal align's."""
    pending: dict[tuple, list[list[int]]] = {}
    for e in examples:
        s = e.samples[0]
        start = s.loss_mask.index(True)
        pending.setdefault(tuple(s.input_ids[:start]), []).append(list(s.input_ids[start:]))
    out = []
    for ids in prompt_ids:
        key = tuple(ids)
        if not pending.get(key):
            sys.exit("TRL's prompt ids differ from align's for the first batch; the comparison would not be fair")
        out.append(pending[key].pop(0))
    return out


def _split(marks: list[dict], warmup: int) -> dict:
    """Mean seconds per optimizer step over the steps after ``warmup``, and its generation / scoring / update parts
    (``warmup`` 0: a check run, losses only)."""
    out = {"losses": [m["loss"] for m in marks], "grad_norms": [m["grad_norm"] for m in marks]}
    if not warmup:
        return out
    timed = marks[warmup:]
    total = (marks[-1]["time"] - marks[warmup - 1]["time"]) / len(timed)
    parts = {k: statistics.mean(m[k] for m in timed) for k in ("generation", "scoring")}
    parts["update"] = total - parts["generation"] - parts["scoring"]
    length = statistics.mean(m["completion_length"] for m in timed)
    return {**out, "value": total, **parts, "length": length,
            "text": f"{total:.2f} s/step (generation {parts['generation']:.2f}, scoring {parts['scoring']:.2f}, update "
                    f"{parts['update']:.2f}), mean completion {length:.1f} tokens"}


def main(argv=None) -> int:
    p = side_by_side_parser(__doc__, steps=3, lr=1e-6)
    p.add_argument("--engine", choices=("hf", "vllm"), default=None, help="default: vllm on a GPU, hf on CPU")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (group size)")
    p.add_argument("--prompt-median", type=float, default=48)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--beta", type=float, default=0.04)
    args = p.parse_args(argv)
    if (args.prompts * args.n) % args.grad_accum:
        p.error("--prompts × --n must be a multiple of --grad-accum")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")

    import torch
    import transformers
    import trl

    args.engine = args.engine or ("vllm" if torch.cuda.is_available() else "hf")
    root, model_path, shape = setup_model(args, "rl-bench-")
    n_prompts = (args.warmup + args.steps) * args.prompts
    rows = workload.prompt_rows(n_prompts, args.vocab, args.seed, args.prompt_median, high=args.max_prompt)
    prompts_path = workload.write_jsonl(os.path.join(root, "prompts.jsonl"), rows)
    engine = {"hf": "transformers generate", "vllm": "vLLM (colocated)"}[args.engine]
    settings = (f"{shape}, {args.dtype}, GRPO (β={args.beta}, clip 0.2), {args.prompts} prompts × n={args.n} "
                f"per step (prompt median {args.prompt_median:.0f} tokens), max_new_tokens {args.max_new_tokens}, "
                f"temperature 1, {engine} on both sides, grad-accum {args.grad_accum}, {args.warmup} warm-up + "
                f"{args.steps} timed steps per run, {torch.get_num_threads()} torch thread(s); TRL {trl.__version__} "
                f"(transformers {transformers.__version__})")
    print(settings, flush=True)

    # the check: align's first experience, replayed through TRL's scoring and update
    experience: list = []
    first_align = align_run(args, model_path, prompts_path, root, capture=experience)
    first_trl = trl_run(args, model_path, rows, root, inject=experience)
    check = harness.AgreementCheck(loss_atol=1e-6)  # GRPO's first-step loss is 0 up to rounding (ratio 1, Σ Â = 0)
    check.wrap("align", lambda: first_align)()
    check.wrap("TRL", lambda: first_trl)()
    print(check.summary() + " on align's first experience batch", flush=True)

    _, results = harness.run_sides(args, lambda: align_run(args, model_path, prompts_path, root),
                                   lambda first: trl_run(args, model_path, rows, root), check)
    med = {side: {k: median(v, k) for k in ("value", *PARTS, "length")} for side, v in results.items()}
    ratio = med["TRL"]["value"] / med["align"]["value"]
    for side, m in med.items():
        print(f"{side}: {m['value']:.2f} s/step (generation {m['generation']:.2f}, scoring {m['scoring']:.2f}, update "
              f"{m['update']:.2f}; medians of {args.repeats}), mean completion {m['length']:.1f} tokens")
    print(f"ratio TRL / align seconds per step: {ratio:.2f}x", flush=True)
    if not args.no_record:
        parts = "; ".join(f"{side} {m['value']:.2f} s (generation {m['generation']:.2f} / scoring {m['scoring']:.2f} / "
                          f"update {m['update']:.2f}, completions {m['length']:.0f} tokens)" for side, m in med.items())
        result = (f"{settings}. {check.summary()} on align's first experience batch. Seconds per optimizer step, "
                  f"median of {args.repeats} alternating runs ({harness.runs_text(results, 2)}): {parts}: align "
                  f"**{ratio:.2f}× faster**")
        record("rl_step.py", argv, result, args.note, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
