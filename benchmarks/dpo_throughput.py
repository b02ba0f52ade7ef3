"""DPO throughput: align ``dpo`` vs TRL ``DPOTrainer``, both with precomputed reference log-probs, in one run.

    OMP_NUM_THREADS=1 python benchmarks/dpo_throughput.py                    # CPU: 37M-param Llama, vocab 32,768
    OMP_NUM_THREADS=1 python benchmarks/dpo_throughput.py --model smollm2 --prompt-median 24 --completion-median 32
    python benchmarks/dpo_throughput.py --hidden 1024 --layers 16 --batch 8 --steps 20   # a GPU

Model and data as in ``sft_throughput.py`` (``benchmarks/workload.py``): a random Llama with a word-level vocabulary
and plain-text prompt/chosen/rejected rows of log-normal lengths, tokenized to the same ids by both libraries
(checked); ``--model smollm2``: SmolLM2-135M-Instruct (``align/prepared.py``) and its own tokenizer. Both run
sigmoid DPO (β = 0.1) with the reference log-probs computed in one pass before training (align
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

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, workload  # noqa: E402
from benchmarks.common import median, record, setup_model, side_by_side_parser  # noqa: E402


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
    p = side_by_side_parser(__doc__, steps=5, lr=1e-6, batch=2, batch_help="pairs per micro-batch",
                            text_rows=True)
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args(argv)

    import torch
    import transformers
    import trl

    from align.config import DataConfig
    from align.data import load_examples
    from align.models import load_tokenizer

    root, model_path, shape = setup_model(args, "dpo-bench-", max(2048, args.max_length))
    per_step = args.batch * args.grad_accum
    n_rows = (args.warmup + args.steps) * per_step
    rows = workload.preference_rows(n_rows, args.vocab, args.max_length, args.seed, args.prompt_median,
                                    args.completion_median)
    random.Random(args.seed).shuffle(rows)
    data_path = workload.write_jsonl(os.path.join(root, "pairs.jsonl"), rows)
    examples, _, _ = load_examples(data_path, load_tokenizer(model_path), DataConfig(max_length=args.max_length),
                                   progress=False)
    tokens = sum(len(s.input_ids) for e in examples for s in e.samples)
    settings = (f"{shape}, {args.dtype}, sigmoid DPO β={args.beta}, precomputed reference log-probs, {n_rows} "
                f"pairs (log-normal lengths, median prompt {args.prompt_median:.0f} / completion "
                f"{args.completion_median:.0f} words; {tokens / n_rows:.0f} tokens per pair, max_length "
                f"{args.max_length}), micro-batch {args.batch} pairs × grad-accum {args.grad_accum}, {args.warmup} "
                f"warm-up + {args.steps} timed steps per run, "
                f"{torch.get_num_threads()} torch thread(s); TRL {trl.__version__} (transformers "
                f"{transformers.__version__}), sequential sampler over the shared order, sdpa")
    print(settings, flush=True)

    pairs = [float(per_step)] * (args.warmup + args.steps)
    check, results = harness.run_sides(
        args, lambda: align_run(args, model_path, data_path, root, pairs),
        lambda first: trl_run(args, model_path, rows, root, pairs,
                              (lambda ds: check_same_ids(examples, ds)) if first else None))
    print(check.summary())
    a, t = median(results["align"]), median(results["TRL"])
    pa, pt = results["align"][0]["precompute_s"], results["TRL"][0]["precompute_s"]
    ratio = a / t
    print(f"reference pass over {n_rows} pairs (first run, not counted): align {pa:.1f} s, TRL {pt:.1f} s")
    print(f"align: {a:.2f} pairs/s, TRL: {t:.2f} pairs/s (medians of {args.repeats}); ratio align / TRL: {ratio:.2f}x",
          flush=True)
    if not args.no_record:
        result = (f"{settings}. {check.summary()}. Reference pass (not counted): align {pa:.1f} s, TRL {pt:.1f} s. "
                  f"Pairs/s, median of {args.repeats} alternating runs ({harness.runs_text(results, 2)}): align "
                  f"{a:.2f}, TRL {t:.2f}: **{ratio:.2f}×**")
        record("dpo_throughput.py", argv, result, args.note, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
