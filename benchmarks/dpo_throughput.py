"""DPO throughput: align ``dpo`` vs TRL ``DPOTrainer``, both with precomputed reference log-probs, in one run.

    OMP_NUM_THREADS=1 python benchmarks/dpo_throughput.py                    # CPU: 37M-param Llama, vocab 32,768
    python benchmarks/dpo_throughput.py --hidden 1024 --layers 16 --batch 8 --steps 20   # a GPU

Model and data as in ``sft_throughput.py`` (``benchmarks/workload.py``): a random Llama with a word-level vocabulary
and plain-text prompt/chosen/rejected rows of log-normal lengths, tokenized to the same ids by both libraries
(checked). Both run sigmoid DPO (β = 0.1) with the reference log-probs computed in one pass before training (align
``reference.precompute``, TRL ``precompute_ref_log_probs=True``), AdamW at a constant learning rate, clipping 1.0,
``--batch`` pairs per micro-batch and ``--grad-accum`` micro-batches per optimizer step, fp32 on CPU.

Same pairs in the same optimizer steps: the rows are shuffled once here; align reads them in file order and TRL's
sampler takes them in the same order (TRL's default fixed-size micro-batches: its DPO loss is the mean of
micro-batch means, so transformers' ``batch_rebalance`` sampler, whose micro-batches differ in size, would weight
pairs unequally, and ``group_by_length`` would change which pairs form a step; ``padding_free`` is disabled in
TRL's DPOTrainer at this version). The loss of the first optimizer step must agree (relative 1e-4) before anything
is timed. The figure is pairs per second over the ``--steps`` steps after ``--warmup`` (the reference pass is not
counted; its time is reported separately, from each side's first run). Sides alternate for ``--repeats`` runs;
medians are compared. Appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, workload  # noqa: E402
from benchmarks.common import alternate, median, record, wait_quiet  # noqa: E402


def align_run(args, model_path: str, data_path: str, root: str, pairs: list[int]) -> dict:
    from align.trainer import Trainer

    class Timed(Trainer):
        def _precomputed_reference(self, examples, name):
            t0 = time.perf_counter()
            out = super()._precomputed_reference(examples, name)
            self.precompute_s = time.perf_counter() - t0
            return out

    cfg = {
        "run_dir": harness.tmpdir(root, "align-"), "seed": args.seed, "resume": False,
        "model": {"name": model_path, "dtype": args.dtype, "attn_implementation": "sdpa"},
        "data": {"train": data_path, "max_length": args.max_length, "shuffle": False},
        "loss": {"name": "dpo", "beta": args.beta},
        "reference": {"precompute": True},
        "train": {"steps": args.warmup + args.steps, "batch_size": args.batch * args.grad_accum,
                  "micro_batch_size": args.batch, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                  "grad_clip": 1.0, "weight_decay": 0.0},
        "log": {"progress": False, "tensorboard": False, "plots": False},
    }
    marks, trainer = harness.run_align(cfg, args.warmup + args.steps, Timed)
    out = harness.rate(marks, pairs, args.warmup, "pairs")
    out["precompute_s"] = trainer.precompute_s
    harness.free(trainer)
    return out


def trl_run(args, model_path: str, rows: list[dict], root: str, pairs: list[int], check=None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.precompute_s = time.perf_counter() - t0
            return out

    Trainer = harness.trl_trainer_class(Timed)
    Trainer.sampler = staticmethod(torch.utils.data.SequentialSampler)  # the shared order, TRL's fixed micro-batches
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    cfg = DPOConfig(output_dir=harness.tmpdir(root, "trl-"), use_cpu=not torch.cuda.is_available(), bf16=False,
                    per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
                    max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                    report_to=[], disable_tqdm=True, max_length=args.max_length, beta=args.beta,
                    loss_type=["sigmoid"], precompute_ref_log_probs=True, seed=args.seed, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if check is not None:
        check(trainer.train_dataset)
    trainer.train()
    out = harness.rate(trainer.marks, pairs, args.warmup, "pairs")
    out["precompute_s"] = trainer.precompute_s
    harness.free(trainer, model)
    return out


def check_same_ids(examples, trl_dataset) -> None:
    """align's chosen/rejected rows (ids, loss mask) equal TRL's prompt_ids + chosen_ids / rejected_ids."""
    for i, (e, t) in enumerate(zip(examples, trl_dataset)):
        for s, key in zip(e.samples, ("chosen_ids", "rejected_ids")):
            ids = list(t["prompt_ids"]) + list(t[key])
            mask = [False] * len(t["prompt_ids"]) + [True] * len(t[key])
            if s.input_ids != ids or s.loss_mask != mask:
                sys.exit(f"row {i} ({key}): align and TRL tokenize differently (align {len(s.input_ids)} tokens, TRL "
                         f"{len(ids)}); the comparison would not be fair")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--prompt-median", type=float, default=64)
    p.add_argument("--completion-median", type=float, default=96)
    p.add_argument("--batch", type=int, default=2, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=0.0, help="wait until the 1-min load average stays below this "
                   "for a minute before measuring (0: do not wait)")
    p.add_argument("--note", default="")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import tempfile

    import datasets
    import torch
    import transformers
    import trl

    from align.config import DataConfig
    from align.data import load_examples
    from align.models import load_tokenizer

    datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    root = tempfile.mkdtemp(prefix="dpo-bench-")
    model_path = os.path.join(root, "model")
    n_params = workload.save_model(model_path, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                   intermediate=args.intermediate, max_positions=max(2048, args.max_length),
                                   seed=args.seed)
    per_step = args.batch * args.grad_accum
    n_rows = (args.warmup + args.steps) * per_step
    rows = workload.preference_rows(n_rows, args.vocab, args.max_length, args.seed, args.prompt_median,
                                    args.completion_median)
    random.Random(args.seed).shuffle(rows)
    data_path = workload.write_jsonl(os.path.join(root, "pairs.jsonl"), rows)
    examples, _, _ = load_examples(data_path, load_tokenizer(model_path), DataConfig(max_length=args.max_length),
                                   progress=False)
    tokens = sum(len(s.input_ids) for e in examples for s in e.samples)
    settings = (f"{n_params / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, head_dim 64, vocab "
                f"{args.vocab}), {args.dtype}, sigmoid DPO β={args.beta}, precomputed reference log-probs, {n_rows} "
                f"pairs (log-normal lengths, median prompt {args.prompt_median:.0f} / completion "
                f"{args.completion_median:.0f} tokens; {tokens / n_rows:.0f} tokens per pair), micro-batch {args.batch} "
                f"pairs × grad-accum {args.grad_accum}, {args.warmup} warm-up + {args.steps} timed steps per run, "
                f"{torch.get_num_threads()} torch thread(s); TRL {trl.__version__} (transformers "
                f"{transformers.__version__}), sequential sampler over the shared order, sdpa")
    print(settings, flush=True)

    pairs = [float(per_step)] * (args.warmup + args.steps)
    check = harness.AgreementCheck()
    first_trl = [True]

    def trl_side():
        ids_check = (lambda ds: check_same_ids(examples, ds)) if first_trl and first_trl.pop() else None
        return trl_run(args, model_path, rows, root, pairs, ids_check)

    sides = {"align": check.wrap("align", lambda: align_run(args, model_path, data_path, root, pairs)),
             "TRL": check.wrap("TRL", trl_side)}
    load = wait_quiet(args.max_load)
    print(f"load average {load:.2f}; running {args.repeats} alternating runs per side", flush=True)
    results = alternate(sides, args.repeats)
    print(check.summary())
    a, t = median(results["align"]), median(results["TRL"])
    pa, pt = results["align"][0]["precompute_s"], results["TRL"][0]["precompute_s"]
    ratio = a / t
    print(f"reference pass over {n_rows} pairs (first run, not counted): align {pa:.1f} s, TRL {pt:.1f} s")
    print(f"align: {a:.2f} pairs/s, TRL: {t:.2f} pairs/s (medians of {args.repeats}); ratio align / TRL: {ratio:.2f}x",
          flush=True)
    if not args.no_record:
        runs = "; ".join(f"{k} " + " / ".join(f"{r['value']:.2f}" for r in v) for k, v in results.items())
        result = (f"{settings}. {check.summary()}. Reference pass (not counted): align {pa:.1f} s, TRL {pt:.1f} s. "
                  f"Pairs/s, median of {args.repeats} alternating runs ({runs}): align {a:.2f}, TRL {t:.2f}: "
                  f"**{ratio:.2f}×**")
        loads = [r["load"] for v in results.values() for r in v]
        record("dpo_throughput.py", argv, result, args.note, loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
