"""The ``align`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_train(args) -> int:
    from .config import load_config
    from .pipeline import report, run

    pipe = load_config(args.config, args.overrides)
    results = run(pipe)
    if os.environ.get("RANK", "0") != "0":  # several processes (torchrun / deepspeed): rank 0 reports
        return 0
    table = report(results)
    if table:
        print(table)
    last = list(results.values())[-1] if results else {}
    if last.get("final_model"):
        print(f"run directory: {pipe.run_dir}")
    return 0


def _cmd_losses(args) -> int:
    from .introspect import describe_losses

    print(describe_losses(args.name))
    return 0


def _cmd_rewards(args) -> int:
    from rollouts.rewards import describe_rewards

    print(describe_rewards())
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_run

    written = plot_run(args.run_dir)
    if not written:
        print(f"no metrics.jsonl under {args.run_dir}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


def _cmd_eval(args) -> int:
    from .evalcmd import format_table, run_eval

    result = run_eval(args.target, args.overrides, ref=args.ref, out=args.out)
    print(format_table(result["metrics"]))
    print(f"wrote {result['out']}" + (f" (samples: {result['samples']})" if "samples" in result else ""))
    return 0


def _cmd_generate(args) -> int:
    from .evalcmd import run_generate

    n = run_generate(args.target, args.overrides, args.prompts, args.out)
    print(f"wrote {n} completions to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export

    out = export(args.target, args.out, args.overrides)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="Post-training for language models: SFT, preference "
                                "optimisation and reward-driven RL on one trainer.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config (one stage or a pipeline of stages)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4 loss.beta=0.2")
    t.set_defaults(fn=_cmd_train)

    l = sub.add_parser("losses", help="list registered losses with their options")
    l.add_argument("name", nargs="?", help="show only this loss")
    l.set_defaults(fn=_cmd_losses)

    e = sub.add_parser("eval", help="generate on held-out prompts and report accuracy, pass@k, reward, length, KL")
    e.add_argument("target", help="a run directory, a YAML config, or a model folder")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.n=8 eval.temperature=1.0")
    e.add_argument("--ref", help="reference model folder for KL (default: the model the run started from)")
    e.add_argument("--out", help="JSON file to write (default: TARGET/eval.json)")
    e.set_defaults(fn=_cmd_eval)

    g = sub.add_parser("generate", help="write completions for a prompt file to JSONL")
    g.add_argument("target", help="a run directory, a YAML config, or a model folder")
    g.add_argument("overrides", nargs="*", help="key.sub=value overrides (eval.n, eval.temperature, ...)")
    g.add_argument("--prompts", required=True, help="prompt file (json/jsonl/parquet with a `prompt` column)")
    g.add_argument("--out", required=True, help="output JSONL")
    g.set_defaults(fn=_cmd_generate)

    x = sub.add_parser("export", help="write a run's final model as a full Hugging Face folder (LoRA adapters merged)")
    x.add_argument("target", help="a run directory, or an adapter / model folder")
    x.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.dtype=bfloat16")
    x.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    x.set_defaults(fn=_cmd_export)

    r = sub.add_parser("rewards", help="list the built-in reward functions with their options")
    r.set_defaults(fn=_cmd_rewards)

    pl = sub.add_parser("plot", help="write PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=_cmd_plot)

    # real models and data from installed packages (their own modules)
    from .prepared import add_parser as add_prepare_model
    from .tasks import add_data_parser

    add_prepare_model(sub)
    add_data_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "torch", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after --options; anything else unknown is an error
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .configio import ConfigError
    from .data import DataError
    from .prepared import PrepareError

    from .distributed import shutdown

    ok = False
    try:
        code = args.fn(args)
        ok = code == 0
        return code
    except (ConfigError, DataError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(ok)  # multi-process runs (torchrun / deepspeed): leave the process group cleanly


if __name__ == "__main__":
    sys.exit(main())
