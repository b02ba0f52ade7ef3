"""SFT throughput: align ``sft`` vs TRL ``SFTTrainer``, same model, data, batches and precision, in one run.

    OMP_NUM_THREADS=1 python benchmarks/sft_throughput.py                    # CPU: 37M-param Llama, vocab 32,768
    OMP_NUM_THREADS=1 python benchmarks/sft_throughput.py --model smollm2 --prompt-median 24 --completion-median 32
    python benchmarks/sft_throughput.py --hidden 1024 --layers 16 --batch 8 --steps 20   # a GPU

The model is a random Llama (head_dim 64, tied embeddings) with a word-level vocabulary of ``--vocab`` tokens, and the
data are plain-text prompt/completion rows of log-normal lengths (``benchmarks/workload.py``), so both libraries
tokenize the same text to the same ids (checked). ``--model smollm2`` trains SmolLM2-135M-Instruct
(``align/prepared.py``) instead, on the same words through its own BPE tokenizer (several tokens per word). Both
train the completion tokens with the token-mean NLL, AdamW, constant learning rate, gradient clipping 1.0,
``--batch`` sequences per micro-batch and ``--grad-accum`` micro-batches per optimizer step, in fp32 on CPU (bf16
autocast on a GPU, ``--dtype``).

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

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, workload  # noqa: E402
from benchmarks.common import median, record, setup_model, side_by_side_parser  # noqa: E402


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
    p = side_by_side_parser(__doc__, steps=5, lr=1e-5, batch=4, batch_help="sequences per micro-batch",
                            text_rows=True)
    p.add_argument("--trl-sampling", choices=("batch_rebalance", "sequential"), default="batch_rebalance")
    args = p.parse_args(argv)

    import torch
    import transformers
    import trl

    root, model_path, shape = setup_model(args, "sft-bench-", max(2048, args.max_length))
    n_rows = (args.warmup + args.steps) * args.batch * args.grad_accum
    rows = workload.prompt_completion_rows(n_rows, args.vocab, args.max_length, args.seed, args.prompt_median,
                                           args.completion_median)
    random.Random(args.seed).shuffle(rows)  # the one order both sides read
    data_path = workload.write_jsonl(os.path.join(root, "train.jsonl"), rows)

    from align.config import DataConfig
    from align.data import load_examples
    from align.models import load_tokenizer

    examples, _, _ = load_examples(data_path, load_tokenizer(model_path), DataConfig(max_length=args.max_length),
                                   progress=False)
    per_step = args.batch * args.grad_accum
    tokens = [sum(len(e.samples[0].input_ids) for e in examples[k * per_step : (k + 1) * per_step])
              for k in range(args.warmup + args.steps)]  # non-padding tokens of each optimizer step, both sides
    settings = (f"{shape}, {args.dtype}, {n_rows} prompt/completion rows (log-normal lengths, median prompt "
                f"{args.prompt_median:.0f} / completion {args.completion_median:.0f} words; {sum(tokens) / n_rows:.0f} "
                f"tokens per row, max_length {args.max_length}), micro-batch {args.batch} × grad-accum {args.grad_accum}, "
                f"{args.warmup} warm-up + {args.steps} timed steps per run, {torch.get_num_threads()} torch thread(s); "
                f"TRL {trl.__version__} (transformers {transformers.__version__}) "
                f"train_sampling_strategy={args.trl_sampling}, sdpa")
    print(settings, flush=True)

    # before timing: the same ids (first TRL run), then the same first-step loss (first run of each side)
    check, results = harness.run_sides(
        args, lambda: align_run(args, model_path, data_path, root, tokens),
        lambda first: trl_run(args, model_path, rows, root, tokens,
                              (lambda ds: check_same_ids(examples, ds)) if first else None))
    print(check.summary() + f"; last-step loss: align {results['align'][0]['losses'][-1]:.6f}, TRL "
          f"{results['TRL'][0]['losses'][-1]:.6f}")
    a, t = median(results["align"]), median(results["TRL"])
    ratio = a / t
    print(f"align: {a:.1f} tokens/s, TRL: {t:.1f} tokens/s (medians of {args.repeats}); ratio align / TRL: "
          f"{ratio:.2f}x", flush=True)
    if not args.no_record:
        result = (f"{settings}. {check.summary()}. Trained (non-padding) tokens/s, median of {args.repeats} "
                  f"alternating runs ({harness.runs_text(results, 0)}): align {a:.0f}, TRL {t:.0f}: **{ratio:.2f}×**")
        record("sft_throughput.py", argv, result, args.note, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
