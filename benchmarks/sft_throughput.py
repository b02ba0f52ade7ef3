"""SFT throughput: align ``sft`` vs TRL ``SFTTrainer``, same model, data, batches and precision, in one run.

    OMP_NUM_THREADS=1 python benchmarks/sft_throughput.py                    # CPU: 37M-param Llama, vocab 32,768
    python benchmarks/sft_throughput.py --hidden 1024 --layers 16 --batch 8 --steps 20   # a GPU

The model is a random Llama (head_dim 64, tied embeddings) with a word-level vocabulary of ``--vocab`` tokens, and the
data are plain-text prompt/completion rows of log-normal lengths (``benchmarks/workload.py``), so both libraries
tokenize the same text to the same ids (checked). Both train the completion tokens with the token-mean NLL, AdamW,
constant learning rate, gradient clipping 1.0, ``--batch`` sequences per micro-batch and ``--grad-accum``
micro-batches per optimizer step, in fp32 on CPU (bf16 autocast on a GPU, ``--dtype``).

Same examples in the same optimizer steps: the rows are shuffled once here; align reads them in file order
(``data.shuffle: false``) and TRL's sampler takes them in the same order. How each side cuts an optimizer batch into
micro-batches is its own: align sorts by length (``align/collate.py``); TRL uses transformers'
``train_sampling_strategy="batch_rebalance"`` (sorted by length, micro-batch sizes balanced by padded cost: the best
padding setting TRL offers without FlashAttention; ``padding_free`` and ``packing`` need FlashAttention 2/3 and
give wrong attention with SDPA) or, with ``--trl-sampling sequential``, TRL's default fixed-size micro-batches.

Before anything is timed, the loss of the first optimizer step must agree (relative 1e-4); otherwise the script stops.
Each run builds a fresh trainer and runs ``--warmup`` + ``--steps`` optimizer steps; the figure is trained tokens
(non-padding tokens: prompt and completion) per second over the ``--steps`` timed steps, from the end of the last
warm-up step to the end of the last step (data loading, collation, forward, backward, optimizer, logging included).
The sides alternate for ``--repeats`` runs; medians are compared. Appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, workload  # noqa: E402
from benchmarks.common import alternate, median, record, wait_quiet  # noqa: E402


def align_run(args, model_path: str, data_path: str, root: str, tokens: list[int]) -> dict:
    """A fresh align Trainer for warmup + steps optimizer steps."""
    cfg = {
        "run_dir": harness.tmpdir(root, "align-"), "seed": args.seed, "resume": False,
        "model": {"name": model_path, "dtype": args.dtype, "attn_implementation": "sdpa"},
        "data": {"train": data_path, "max_length": args.max_length, "shuffle": False},
        "loss": {"name": "sft"},
        "train": {"steps": args.warmup + args.steps, "batch_size": args.batch * args.grad_accum,
                  "micro_batch_size": args.batch, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                  "grad_clip": 1.0, "weight_decay": 0.0},
        "log": {"progress": False, "tensorboard": False, "plots": False},
    }
    marks, trainer = harness.run_align(cfg, args.warmup + args.steps)
    harness.free(trainer)
    return harness.rate(marks, tokens, args.warmup, "tokens")


def trl_run(args, model_path: str, rows: list[dict], root: str, tokens: list[int], check=None) -> dict:
    """A fresh TRL SFTTrainer for warmup + steps optimizer steps, reading the rows in the shared order."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import SFTConfig, SFTTrainer

    def sampler(ds):
        if args.trl_sampling == "batch_rebalance":  # transformers' own sampler, without its shuffle
            return BatchRebalanceSampler([len(x) for x in ds["input_ids"]], args.batch * args.grad_accum, dp_size=1,
                                         grad_accum=args.grad_accum, shuffle=False)
        return torch.utils.data.SequentialSampler(ds)

    Trainer = harness.trl_trainer_class(SFTTrainer)
    Trainer.sampler = staticmethod(sampler)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    cfg = SFTConfig(output_dir=harness.tmpdir(root, "trl-"), use_cpu=not torch.cuda.is_available(),
                    bf16=False, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
                    max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                    report_to=[], disable_tqdm=True, max_length=args.max_length, completion_only_loss=True,
                    seed=args.seed, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if check is not None:
        check(trainer.train_dataset)
    trainer.train()
    out = harness.rate(trainer.marks, tokens, args.warmup, "tokens")
    harness.free(trainer, model)
    return out


def check_same_ids(examples, trl_dataset) -> None:
    """align's tokenisation of the rows (ids and loss mask) equals TRL's (input_ids, labels != -100)."""
    for i, (e, t) in enumerate(zip(examples, trl_dataset)):
        s = e.samples[0]
        trl_mask = [label != -100 for label in t["labels"]]
        trl_mask[0] = False
        if s.input_ids != list(t["input_ids"]) or s.loss_mask != trl_mask:
            sys.exit(f"row {i}: align and TRL tokenize differently (align {len(s.input_ids)} tokens, TRL "
                     f"{len(t['input_ids'])}); the comparison would not be fair")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--model", default=None, help="an existing model folder instead of the random Llama (its "
                   "tokenizer must map the workload's words: use with --vocab matching a word-level tokenizer)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--prompt-median", type=float, default=64)
    p.add_argument("--completion-median", type=float, default=96)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before timing")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trl-sampling", choices=("batch_rebalance", "sequential"), default="batch_rebalance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=0.0, help="wait until the 1-min load average stays below this "
                   "for a minute before measuring (0: do not wait)")
    p.add_argument("--note", default="")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import datasets
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    root = tempfile.mkdtemp(prefix="sft-bench-")
    model_path = args.model or os.path.join(root, "model")
    if args.model is None:
        n_params = workload.save_model(model_path, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                                       intermediate=args.intermediate, max_positions=max(2048, args.max_length),
                                       seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM

        n_params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    n_rows = (args.warmup + args.steps) * args.batch * args.grad_accum
    rows = workload.prompt_completion_rows(n_rows, args.vocab, args.max_length, args.seed, args.prompt_median,
                                           args.completion_median)
    random.Random(args.seed).shuffle(rows)  # the one order both sides read
    data_path = workload.write_jsonl(os.path.join(root, "train.jsonl"), rows)
    shape = (f"{n_params / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, head_dim 64, vocab "
             f"{args.vocab})" if args.model is None else f"{args.model} ({n_params / 1e6:.1f}M params)")
    settings = (f"{shape}, {args.dtype}, {n_rows} prompt/completion rows (log-normal lengths, median prompt "
                f"{args.prompt_median:.0f} / completion {args.completion_median:.0f} tokens, max_length "
                f"{args.max_length}), micro-batch {args.batch} × grad-accum {args.grad_accum}, {args.warmup} warm-up + "
                f"{args.steps} timed steps per run, {torch.get_num_threads()} torch thread(s); TRL {trl.__version__} "
                f"(transformers {transformers.__version__}) train_sampling_strategy={args.trl_sampling}, sdpa")
    print(settings, flush=True)

    from align.config import DataConfig
    from align.data import load_examples
    from align.models import load_tokenizer

    examples, _, _ = load_examples(data_path, load_tokenizer(model_path), DataConfig(max_length=args.max_length),
                                   progress=False)
    per_step = args.batch * args.grad_accum
    tokens = [sum(len(e.samples[0].input_ids) for e in examples[k * per_step : (k + 1) * per_step])
              for k in range(args.warmup + args.steps)]  # non-padding tokens of each optimizer step, both sides

    # before timing: the same ids (first TRL run), then the same first-step loss (first run of each side)
    check = harness.AgreementCheck()
    first_trl = [True]

    def trl_side():
        ids_check = (lambda ds: check_same_ids(examples, ds)) if first_trl and first_trl.pop() else None
        return trl_run(args, model_path, rows, root, tokens, ids_check)

    sides = {"align": check.wrap("align", lambda: align_run(args, model_path, data_path, root, tokens)),
             "TRL": check.wrap("TRL", trl_side)}
    load = wait_quiet(args.max_load)
    print(f"load average {load:.2f}; running {args.repeats} alternating runs per side", flush=True)
    results = alternate(sides, args.repeats)
    print(check.summary() + f"; last-step loss: align {results['align'][0]['losses'][-1]:.6f}, TRL "
          f"{results['TRL'][0]['losses'][-1]:.6f}")
    a, t = median(results["align"]), median(results["TRL"])
    ratio = a / t
    print(f"align: {a:.1f} tokens/s, TRL: {t:.1f} tokens/s (medians of {args.repeats}); ratio align / TRL: "
          f"{ratio:.2f}x", flush=True)
    if not args.no_record:
        runs = "; ".join(f"{k} " + " / ".join(f"{r['value']:.0f}" for r in v) for k, v in results.items())
        result = (f"{settings}. {check.summary()}. Trained (non-padding) tokens/s, "
                  f"median of {args.repeats} alternating runs ({runs}): align {a:.0f}, TRL {t:.0f}: **{ratio:.2f}×**")
        loads = [r["load"] for v in results.values() for r in v]
        record("sft_throughput.py", argv, result, args.note, loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
