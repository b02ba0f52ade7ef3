"""Per-token log-probabilities in fp32 without materialising the (B, T, V) log-softmax.

The decoder runs once to final hidden states (B, T, H). The LM head and the fp32 log-softmax then run only on the
positions that carry a loss, in chunks of ``chunk_tokens`` rows: each chunk's (chunk, V) logits exist during its own
forward and are recomputed in backward, so the peak is one chunk's logits instead of the whole batch's. Gradients are
exact (the same math, recomputed). A plain ``nn.Linear`` head goes through ``align/fused_head.py`` (one (chunk, V)
buffer, the weight gradient accumulated in place); any other head module runs each chunk under activation
checkpointing.

Convention (losses/batch.py): ``logprobs[:, t] = log π(input_ids[:, t] | input_ids[:, :t])``; the hidden state that
predicts token t sits at position t − 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fused_head import LinearLogprobs, plain_linear_head
from .packing import pack_plan, packed_decoder_hidden


def decoder_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final hidden states (after the last norm), the input of the LM head; a right-padded batch on CPU runs
    padding-free when that is cheaper (``align/packing.py``)."""
    decoder = model.get_decoder()
    lengths = pack_plan(model, attention_mask)
    if lengths is not None:
        return packed_decoder_hidden(decoder, input_ids, attention_mask, lengths)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
    return out.last_hidden_state


def logit_transform(model, temperature: float = 1.0) -> tuple[float, float | None, float]:
    """(logit scale, final soft-cap or None, 1 / temperature) of ``model``: z = softcap·tanh(s·x / softcap) / T."""
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere-style models scale their logits
    if isinstance(scale, torch.nn.Parameter) or scale is None:
        scale = 1.0  # a learned scale is not a plain number; not supported here
    return float(scale), softcap, 1.0 / temperature


def logits_fn(model, temperature: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (N, H) → fp32 logits (N, V), with the model's own logit scaling / soft-capping and a temperature."""
    head = model.get_output_embeddings()
    scale, softcap, inv_t = logit_transform(model, temperature)

    def fn(h: torch.Tensor) -> torch.Tensor:
        z = head(h).float()
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        return z * inv_t if inv_t != 1.0 else z

    return fn


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log_softmax(z)[y] = z_y − logsumexp(z), in fp32
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _map_chunks(fn, chunk_tokens: int, *tensors: torch.Tensor, n_chunks: int | None = None) -> torch.Tensor:
    """Apply ``fn`` to row chunks of ``tensors`` (checkpointed when a gradient is needed) and concatenate.

    ``n_chunks``: call ``fn`` exactly this many times (trailing chunks empty). Under ZeRO-3 every call of the LM head
    gathers its weight, a collective, so all ranks must make the same number of calls (align/distributed.py
    ``agreed_chunks``)."""
    n = tensors[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    count = -(-n // chunk_tokens)
    if n_chunks is not None:
        if n_chunks < count:
            raise ValueError(f"n_chunks={n_chunks} cannot hold {n} rows in chunks of {chunk_tokens}")
        count = n_chunks
    outs = []
    for i in range(count):
        parts = [t[i * chunk_tokens : (i + 1) * chunk_tokens] for t in tensors]
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if needs_grad else fn(*parts))
    return torch.cat(outs) if outs else tensors[0].new_zeros(0, dtype=torch.float32)


def _scatter(values: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """(N,) values at the True positions of (B, T) mask → (B, T) fp32, zero elsewhere, graph-connected."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out = out.masked_scatter(mask, values)
    if values.numel() == 0 and anchor.requires_grad:
        out = out + 0.0 * anchor.sum()  # an empty micro-batch still returns a connected zero (no DDP/ZeRO hang)
    return out


def token_logprobs(
    model,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    n_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) fp32 log-probs of ``input_ids`` at ``mask`` positions (zero elsewhere), and optionally the (B, T)
    entropy of the predictive distribution there (no gradient)."""
    mask, pred_mask = _pred_positions(mask)  # nothing predicts the first token
    h = hidden[pred_mask]  # (N, H): hidden states that predict the masked tokens, row-major order
    targets = input_ids[mask]  # (N,)
    logits = logits_fn(model, temperature)
    linear = plain_linear_head(model) if n_chunks is None else None
    if linear is not None:  # one (chunk, V) buffer, weight gradient accumulated in place (align/fused_head.py)
        lp = LinearLogprobs.apply(h, *linear, targets, chunk_tokens, *logit_transform(model, temperature))
    else:  # any head module (adapters, ZeRO-3 partitions with a fixed number of calls): checkpointed chunks
        def chunk_fn(h_chunk, t_chunk):
            return _gather_logprobs(logits(h_chunk), t_chunk)

        lp = _map_chunks(chunk_fn, chunk_tokens, h, targets, n_chunks=n_chunks)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ent = _map_chunks(lambda hc: _entropy(logits(hc)), chunk_tokens, h.detach(), n_chunks=n_chunks)
        entropy = _scatter(ent, mask, hidden)
    return _scatter(lp, mask, hidden), entropy


def _pred_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of trained tokens with position 0 cleared, mask of the hidden states that predict them)."""
    mask = mask.clone()
    mask[:, 0] = False
    pred_mask = torch.zeros_like(mask)
    pred_mask[:, :-1] = mask[:, 1:]
    return mask, pred_mask


def full_kl(
    p_model,
    p_hidden: torch.Tensor,
    q_model,
    q_hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    n_chunks: int | None = None,
    p_constant: bool = False,
) -> torch.Tensor:
    """(B, T) exact KL(P(·|c_t) ‖ Q(·|c_t)) = Σ_v P(v)[log P(v) − log Q(v)] over the whole vocabulary at ``mask``
    positions, chunked. Gradients flow into whichever hidden states require them; ``p_constant`` evaluates P under
    no_grad, so not even its LM head gets a gradient (a frozen reference may share that head with the policy, e.g.
    LoRA with adapters disabled)."""
    mask, pred_mask = _pred_positions(mask)
    hp, hq = p_hidden[pred_mask], q_hidden[pred_mask]
    p_logits, q_logits = logits_fn(p_model), logits_fn(q_model)

    def chunk_fn(hp_chunk, hq_chunk):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not p_constant):
            logp = F.log_softmax(p_logits(hp_chunk), dim=-1)
        logq = F.log_softmax(q_logits(hq_chunk), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1)

    kl = _map_chunks(chunk_fn, chunk_tokens, hp, hq, n_chunks=n_chunks)
    return _scatter(kl, mask, p_hidden if p_hidden.requires_grad else q_hidden)


def ref_kl(policy, hidden: torch.Tensor, ref, ref_hidden: torch.Tensor, mask: torch.Tensor, *,
           chunk_tokens: int = 1024, n_chunks: int | None = None) -> torch.Tensor:
    """(B, T) exact forward KL(π_ref(·|c_t) ‖ π_θ(·|c_t)) at ``mask`` positions (ASFT's anchor). ``ref_hidden`` is
    constant; the gradient flows through π_θ only (its logit-gradient is softmax(z_θ) − π_ref)."""
    return full_kl(ref, ref_hidden.detach(), policy, hidden, mask, chunk_tokens=chunk_tokens, n_chunks=n_chunks,
                   p_constant=True)


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
                     chunk_tokens: int = 1024, with_entropy: bool = False, n_chunks: int | None = None,
                     temperature: float = 1.0):
    """The policy forward: (B, T, H) hidden states, (B, T) fp32 log-probs at ``loss_mask``, (B, T) entropy or None,
    of softmax(logits / temperature)."""
    hidden = decoder_hidden(model, input_ids, attention_mask)
    lp, ent = token_logprobs(model, hidden, input_ids, loss_mask, chunk_tokens=chunk_tokens, temperature=temperature,
                             with_entropy=with_entropy, n_chunks=n_chunks)
    return hidden, lp, ent
