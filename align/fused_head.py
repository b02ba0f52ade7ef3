"""log π(y_t) = z_{y_t} − logsumexp(z), z = f(h W^T + b), for a plain linear LM head: chunked, one (chunk, V) tile.

The generic path in ``align/head.py`` runs every chunk under activation checkpointing, which is exact and works for
any head module, but autograd then keeps several (chunk, V) temporaries per chunk (logits, softmax, the scattered
gather gradient, their sum) and adds each chunk's (V, H) weight gradient into ``W.grad`` through a second (V, H)
tensor. For a plain ``nn.Linear`` head this function computes the same values and gradients with one (chunk, V)
buffer and accumulates the weight gradient in place:

    forward, per chunk:   z = f(h_c W^T + b)   (c, V) fp32;  lp = z_y − lse,  lse = m + log Σ exp(z − m)
    backward, per chunk:  recompute z;  G = g ⊙ (onehot(y) − exp(z − lse))        (c, V), in place
                          ∂/∂(h W^T + b) = f'(·) ⊙ G;  ∂h_c = G' W;  ∂W += G'^T h_c;  ∂b += Σ_rows G'

with f(x) = softcap·tanh(s·x/softcap)/T (s: the model's logit scale, T: the temperature; no softcap: s·x/T), and
g = ∂loss/∂lp from the caller. Liger-Kernel's fused linear cross-entropy and TRL's ``ChunkedLogProbFunction`` do the
same on GPUs; this is the plain-torch version for any device, written by hand because neither is importable here
without Triton and neither takes an arbitrary upstream gradient per token on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_linear_head(model):
    """The LM head as (weight, bias) when it is a hook-free ``nn.Linear`` whose weight is a real tensor (not a ZeRO-3
    partition or an adapter-wrapped layer); None otherwise (then the generic checkpointed path runs)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if hasattr(head.weight, "ds_id") or head.weight.dim() != 2 or head.weight.numel() == 0:
        return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    return head.weight, head.bias


class LinearLogprobs(torch.autograd.Function):
    """(N,) log-probs of ``targets`` under f(hidden @ weight.T + bias), chunked over the N rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, scale: float, softcap: float | None, inv_t: float):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = _logits(hidden[s : s + chunk], weight, bias, scale, softcap, inv_t)  # (c, V) fp32
            target = z.gather(1, targets[s : s + chunk, None])[:, 0]
            m = z.amax(1)
            lse[s : s + chunk] = m + z.sub_(m[:, None]).exp_().sum(1).log_()  # z is consumed in place
            lp[s : s + chunk] = target - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.params = (chunk, scale, softcap, inv_t)
        return lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, scale, softcap, inv_t = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_b and bias is not None else None
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            c = h.shape[0]
            g = grad_lp[s : s + chunk].float()
            raw = F.linear(h, weight, bias).float()  # (c, V): h W^T + b
            tanh = torch.tanh(raw * (scale / softcap)) if softcap is not None else None
            z = tanh * (softcap * inv_t) if tanh is not None else raw.mul_(scale * inv_t)
            # ∂lp/∂z = onehot(y) − softmax(z), times the upstream gradient g: G (c, V), built in z's buffer
            G = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])
            G[rows[:c], targets[s : s + chunk]] += g
            # chain through f: ∂z/∂raw = s/T (· (1 − tanh²) with a softcap)
            G.mul_(scale * inv_t)
            if tanh is not None:
                G.mul_(1 - tanh.square_())
            if need_h:
                grad_h[s : s + chunk] = (G.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(G.t(), h.float())
            if grad_b is not None:
                grad_b += G.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _logits(h, weight, bias, scale: float, softcap: float | None, inv_t: float) -> torch.Tensor:
    z = F.linear(h, weight, bias).float()
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z.mul_(inv_t) if inv_t != 1.0 else z
