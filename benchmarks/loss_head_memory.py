"""Peak memory of align's chunked log-prob head vs the naive full-logits log_softmax, forward + backward, as a ratio.

    OMP_NUM_THREADS=1 python benchmarks/loss_head_memory.py                     # vocab 151,936, 4,096 tokens
    OMP_NUM_THREADS=1 python benchmarks/loss_head_memory.py --chunks 2048,1024,512,256

The LM head of a Qwen2.5-0.5B-shaped model (hidden 896, vocabulary 151,936, fp32) turns 4,096 final hidden states
into the per-token log-probabilities of the next tokens, and a token-mean NLL is backpropagated into the head weight
and the hidden states. Two ways:

- naive: ``log_softmax(hidden @ W.T)`` over the whole (T, V) logits, then gather (what a plain training loop does);
- align: ``align.head.token_logprobs`` (LM head + fp32 log-softmax in chunks of ``chunk_tokens`` rows, each chunk
  recomputed in backward), for each ``--chunks`` value. For a plain linear head this is ``align/fused_head.py`` (one
  (chunk, V) buffer, weight gradient accumulated in place); ``--checkpointed`` also measures the generic path that
  other heads take (each chunk under activation checkpointing; the only path before fused_head.py existed).

Each variant runs in a fresh subprocess: it builds the weight and hidden states, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs forward + backward once and reads ``VmHWM``. The figure is the peak resident memory
above what the process held before the forward (weight and hidden states), so it counts the logits, their gradients
and the head's weight and hidden-state gradients. Before the ratios are printed, every variant's loss and gradients
must equal the naive ones (relative 1e-4). Appends a row to benchmarks/RESULTS.md (``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import REPO, record  # noqa: E402


def _rss_kib(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _meminfo_kib(field: str) -> int:
    return _rss_kib(field, "/proc/meminfo")


def child(variant: str, chunk: int, vocab: int, seq: int, hidden: int, seed: int) -> dict:
    """Run one variant once in this (fresh) process; returns its peak memory above the baseline and checksums."""
    import torch

    from align.head import token_logprobs

    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    h = torch.randn(1, seq, hidden).requires_grad_(True)  # (1, T, H) final hidden states, a leaf
    ids = torch.randint(0, vocab, (1, seq))  # (1, T)
    mask = torch.ones(1, seq, dtype=torch.bool)
    mask[:, 0] = False  # nothing predicts the first token
    n = int(mask.sum())

    class Model(torch.nn.Module):  # the one method align.head needs of a causal LM
        def __init__(self):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

    model = Model()

    def forward_backward(h, ids, mask, n):
        if variant == "naive":
            logits = head(h[:, :-1]).float()  # (1, T-1, V)
            logp = torch.log_softmax(logits, dim=-1)
            lp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (1, T-1)
        elif variant == "align":  # the default path: align/fused_head.py for this plain nn.Linear head
            lp, _ = token_logprobs(model, h, ids, mask, chunk_tokens=chunk)  # (1, T), zero at position 0
        else:  # "checkpointed": the generic path (n_chunks is how ZeRO-3 asks for it; here it only selects it)
            lp, _ = token_logprobs(model, h, ids, mask, chunk_tokens=chunk, n_chunks=-(-int(mask.sum()) // chunk))
        loss = -lp.sum() / n
        loss.backward()
        return loss

    # warm-up on 8 tokens: loads the kernels' code pages and the autograd engine, which count in resident memory
    forward_backward(h[:, :8].detach().requires_grad_(True), ids[:, :8], mask[:, :8], 7)
    head.weight.grad = None
    base = _rss_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = forward_backward(h, ids, mask, n)
    secs = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    g = torch.Generator().manual_seed(1)
    r = torch.randn(h.shape, generator=g)
    return {"variant": variant, "chunk": chunk, "peak_mib": (peak - base) / 1024, "base_mib": base / 1024,
            "seconds": secs, "loss": float(loss), "grad_w_norm": float(head.weight.grad.norm()),
            "grad_h_norm": float(h.grad.norm()), "grad_h_proj": float((h.grad * r).sum())}


def run_child(variant: str, chunk: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--chunk", str(chunk), "--vocab",
           str(args.vocab), "--seq", str(args.seq), "--hidden", str(args.hidden), "--seed", str(args.seed)]
    # glibc serves large allocations with mmap and returns them on free only above its (adaptive) mmap threshold;
    # a fixed 128 KiB threshold makes resident memory follow the live tensors in both variants alike
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same(a: dict, b: dict, rtol: float = 1e-4) -> str | None:
    for k in ("loss", "grad_w_norm", "grad_h_norm", "grad_h_proj"):
        if abs(a[k] - b[k]) > rtol * max(abs(a[k]), abs(b[k]), 1e-12):
            return f"{k}: {a[k]!r} vs {b[k]!r}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--chunks", default=None, help="align chunk_tokens values, comma-separated (default: the "
                   "model.chunk_tokens default and its halves/doubles)")
    p.add_argument("--checkpointed", action="store_true", help="also measure the generic checkpointed path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.chunk, args.vocab, args.seq, args.hidden, args.seed)))
        return 0

    from align.config import ModelConfig

    default = ModelConfig().chunk_tokens
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [default * 2, default, default // 2]
    need = 3.2 * args.seq * args.vocab * 4 / 2**30  # the naive variant's logits, log-probs and their gradients
    avail = _meminfo_kib("MemAvailable") / 2**20  # free pages + reclaimable page cache
    settings = (f"LM head hidden {args.hidden} → vocab {args.vocab}, {args.seq} tokens, fp32, token-mean NLL, "
                f"forward + backward (grads of W and hidden), fresh process per variant, peak RSS above the "
                f"pre-forward baseline")
    print(settings)
    print(f"naive needs about {need:.1f} GiB; {avail:.1f} GiB available", flush=True)
    if avail < need * 1.2:
        print("not enough free memory for the naive variant; lower --seq or --vocab", file=sys.stderr)
        return 1
    naive = run_child("naive", 0, args)
    print(f"  naive                           peak {naive['peak_mib']:8.0f} MiB  {naive['seconds']:6.2f} s", flush=True)
    rows = []
    for c in chunks:
        for variant in ("align", "checkpointed") if args.checkpointed else ("align",):
            r = run_child(variant, c, args)
            bad = same(r, naive)
            if bad:
                print(f"{variant} (chunk_tokens={c}) does not compute what the naive head does: {bad}", file=sys.stderr)
                return 2
            ratio = r["peak_mib"] / naive["peak_mib"]
            rows.append((variant, c, r, ratio))
            print(f"  {variant:<12} chunk_tokens={c:<5} peak {r['peak_mib']:8.0f} MiB  {r['seconds']:6.2f} s  ratio "
                  f"{ratio:.3f}{'  (default)' if c == default else ''}", flush=True)
    print("loss and gradients equal the naive ones to 1e-4 (relative) for every variant")
    if not args.no_record:
        parts = "; ".join(f"{'align' if v == 'align' else 'align checkpointed path'} chunk_tokens {c}"
                          f"{' (default)' if c == default else ''}: {r['peak_mib']:.0f} MiB, {r['seconds']:.1f} s, "
                          f"**{ratio:.2f}×**" for v, c, r, ratio in rows)
        result = (f"{settings}; loss and gradients equal to 1e-4. naive: {naive['peak_mib']:.0f} MiB, "
                  f"{naive['seconds']:.1f} s; {parts}")
        record("loss_head_memory.py", argv, result, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
