"""How far a trained model has moved from where it started, measured on held-out demonstrations.

    drift = (1/N) Σ_{i,t} m_{i,t} KL(π_θ(·|c_{i,t}) ‖ π_init(·|c_{i,t}))
          = (1/N) Σ_{i,t} m_{i,t} Σ_v π_θ(v|c_{i,t}) [log π_θ(v|c_{i,t}) − log π_init(v|c_{i,t})]

teacher-forced on the held-out reference completions (c_{i,t} = prompt + the first t−1 answer tokens), exact over
the whole vocabulary at every completion token (m = loss mask, N = Σ m). Using the reference answers rather than
each model's own generations (what ``align eval`` reports as ``kl_to_ref``) gives every model the same contexts, so
the numbers are comparable across runs. The same pass also reports the mean negative log-likelihood of the
reference answers.
"""

from __future__ import annotations

import torch

from rollouts.types import Example

from .collate import collate
from .head import decoder_hidden, full_kl, token_logprobs


@torch.no_grad()
def held_out_drift(model, init, examples: list[Example], pad_id: int, *, batch_size: int = 64,
                   chunk_tokens: int = 1024) -> dict[str, float]:
    """{"kl": mean per-token KL(π_model ‖ π_init), "nll": mean per-token −log π_model(y_t)} over ``examples``."""
    device = next(model.parameters()).device
    kl_sum, nll_sum, count = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch, _ = collate(examples[start : start + batch_size], pad_id)
        batch = batch.to(device)
        h = decoder_hidden(model, batch.input_ids, batch.attention_mask)
        h_init = decoder_hidden(init, batch.input_ids, batch.attention_mask)
        kl = full_kl(model, h, init, h_init, batch.loss_mask, chunk_tokens=chunk_tokens)  # (B, T) KL(π_θ ‖ π_init)
        lp, _ = token_logprobs(model, h, batch.input_ids, batch.loss_mask, chunk_tokens=chunk_tokens)
        mask = batch.loss_mask
        kl_sum += float(kl[mask].sum())
        nll_sum += float(-lp[mask].sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("held_out_drift: the examples have no completion tokens to measure on")
    return {"kl": kl_sum / count, "nll": nll_sum / count}
