"""Padding-free decoder forward: the real tokens of a right-padded (B, T) batch as one (1, N) row, N = Σ lengths.

Position ids restart at 0 for each row, and transformers' masking utilities turn restarting position ids (with no 2-D
attention mask) into a block-diagonal causal mask, so each row attends only to itself: the hidden states equal the
padded forward's at every real position (tested to 1e-5). The (B·T − N) padding positions then cost no linear-layer
work, which on CPU is most of a small model's time (``benchmarks/dpo_throughput.py``: 35–40% of a DPO micro-batch's
tokens are padding at a log-normal length spread).

Attention over one (N, N) masked block costs N² where the padded batch costs B·T², so packing is taken only when the
estimated FLOPs drop (linear layers 2·P per token, P the per-layer weights; attention 4·h per query-key pair). On a
GPU the padded path is kept: its SDPA runs the causal flash kernel, which a dense block mask would lose
(``attn_implementation: flash_attention_2`` packs natively through the same position ids; not measured here).
"""

from __future__ import annotations

import torch

# decoders whose attention masks come from transformers' ``create_causal_mask`` with packed position ids (tested:
# llama, qwen2); any other model keeps the padded forward
PACKABLE = frozenset({"llama", "qwen2"})
ATTENTION = frozenset({"sdpa", "eager"})


def pack_plan(model, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B,) row lengths when packing this batch pays off, else None (no padding, left padding, GPU, another model)."""
    config = getattr(model, "config", None)
    if attention_mask.device.type != "cpu" or attention_mask.dim() != 2 or attention_mask.shape[0] < 2:
        return None
    if getattr(config, "model_type", None) not in PACKABLE or getattr(config, "_attn_implementation", None) not in ATTENTION:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(1)  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]) or int(lengths.min()) == 0:
        return None  # not right-padded (generation batches are left-padded), or an empty row
    b, t, n = mask.shape[0], mask.shape[1], int(lengths.sum())
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    linear = 2 * (2 * h * h + 2 * h * kv * head_dim + 3 * h * inter)  # FLOPs per token per layer
    attention = 4 * h  # FLOPs per query-key pair per layer (QKᵀ and AV)
    padded = b * t * linear + b * t * t * attention
    packed = n * linear + n * n * attention
    return lengths if packed < 0.9 * padded else None


def packed_decoder_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final hidden states from one packed forward; zeros at padding positions."""
    mask = attention_mask.bool()  # (B, T), right-padded
    flat = input_ids[mask][None]  # (1, N)
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)  # (N,)
    position_ids = (torch.arange(flat.shape[1], device=flat.device) - starts)[None]  # (1, N): 0.. per row
    hidden = decoder(input_ids=flat, position_ids=position_ids, use_cache=False).last_hidden_state  # (1, N, H)
    out = hidden.new_zeros(*mask.shape, hidden.shape[-1])  # (B, T, H)
    out[mask] = hidden[0]
    return out
