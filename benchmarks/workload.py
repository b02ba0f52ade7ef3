"""The benchmarks' model and data, built offline: a random Llama of a realistic shape and a word-level tokenizer.

Both libraries load the same saved folder and tokenize the same text: the tokenizer is a WordLevel model over
``vocab`` synthetic words ``w0 w1 ...`` split on whitespace, with no BOS/EOS post-processor, so ``"w5 w9"`` is two
tokens in align, in TRL and in vLLM alike. Lengths follow log-normal distributions (a few long rows, many short
ones), as real instruction data does.
"""

from __future__ import annotations

import math
import random

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2


def save_model(path: str, *, vocab: int, hidden: int, layers: int, intermediate: int, max_positions: int = 2048,
               kv_heads: int | None = None, seed: int = 0) -> int:
    """A random LlamaForCausalLM (head_dim 64, tied embeddings) and its word-level tokenizer, saved to ``path``;
    returns the number of parameters."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    heads = hidden // 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         head_dim=64, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, int(round(median * math.exp(rng.gauss(0.0, sigma))))))


def words(rng: random.Random, n: int, vocab: int) -> str:
    """``n`` random words, each one token of the word-level tokenizer (never a special token); a BPE tokenizer (e.g.
    ``--model smollm2``) splits each into a few tokens."""
    return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(n))


def prompt_completion_rows(n: int, vocab: int, max_length: int, seed: int = 0, prompt_median: float = 64,
                           completion_median: float = 96, sigma: float = 0.8) -> list[dict]:
    """Plain-text prompt/completion rows; prompt + completion + EOS fits in ``max_length`` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = lognormal_length(rng, prompt_median, sigma, 4, max_length // 2)
        c = lognormal_length(rng, completion_median, sigma, 2, max_length - p - 1)
        rows.append({"prompt": words(rng, p, vocab), "completion": " " + words(rng, c, vocab)})
    return rows


def preference_rows(n: int, vocab: int, max_length: int, seed: int = 0, prompt_median: float = 64,
                    completion_median: float = 96, sigma: float = 0.8) -> list[dict]:
    """Plain-text prompt/chosen/rejected rows (chosen and rejected of independent lengths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = lognormal_length(rng, prompt_median, sigma, 4, max_length // 2)
        a, b = (lognormal_length(rng, completion_median, sigma, 2, max_length - p - 1) for _ in range(2))
        rows.append({"prompt": words(rng, p, vocab), "chosen": " " + words(rng, a, vocab),
                     "rejected": " " + words(rng, b, vocab)})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def prompt_rows(n: int, vocab: int, seed: int = 0, median: float = 48, sigma: float = 0.5, high: int = 256) -> list[dict]:
    """Plain-text prompts of log-normal lengths (for rollouts)."""
    rng = random.Random(seed)
    return [{"prompt": words(rng, lognormal_length(rng, median, sigma, 4, high), vocab)} for _ in range(n)]


def even_words(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Reward: the fraction of a completion's words with an even id (a cheap, varied score for a random model); the
    same function for align (``benchmarks.workload:even_words``) and TRL (``reward_funcs``)."""
    out = []
    for c in completions:
        ws = c.split()
        out.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in ws) / max(len(ws), 1))
    return out
