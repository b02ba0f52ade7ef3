"""A reference policy that follows the trained one: θ_ref ← (1−γ)·θ_ref + γ·θ after every optimizer step.

A loss asks for it with ``reference_ema = γ > 0`` (J-BOND's anchor, BOND §5; also the soft reference update of
TR-DPO). The trainer's reference model (the one that gives ``ref_logprobs`` and, for ``reference_rewards``, the
reference samples) is then moved in place after each applied step, and saved with every checkpoint (``reference/``)
so a resumed run continues from the same anchor.

Works wherever the reference and the policy hold whole tensors of the same shapes (one process; ZeRO stages 0–2,
which keep a whole copy of the parameters on every rank). Under ZeRO-3 the trainer refuses it before training.
"""

from __future__ import annotations

import os

import torch

FOLDER = "reference"


@torch.no_grad()
def ema_update(reference: torch.nn.Module, policy: torch.nn.Module, gamma: float) -> None:
    """θ_ref ← (1−γ)·θ_ref + γ·θ for every parameter (in the reference's dtype)."""
    ref_params = dict(reference.named_parameters())
    for name, p in policy.named_parameters():
        r = ref_params.get(name)
        if r is None or r.shape != p.shape:
            raise RuntimeError(f"moving reference: parameter {name!r} of the policy has no counterpart of the same shape "
                               "in the reference model")
        r.lerp_(p.detach().to(r.dtype), gamma)


def save(reference: torch.nn.Module, checkpoint_folder: str) -> None:
    reference.save_pretrained(os.path.join(checkpoint_folder, FOLDER), safe_serialization=True)


@torch.no_grad()
def load(reference: torch.nn.Module, checkpoint_folder: str) -> None:
    """Restore the moving reference saved in a checkpoint (safetensors)."""
    from safetensors.torch import load_file

    folder = os.path.join(checkpoint_folder, FOLDER)
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_folder} has no {FOLDER}/model.safetensors: it was written by a run "
                                "without a moving reference; resume with the same loss or start a new run_dir")
    state = load_file(path)
    missing, _ = reference.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # saved once when tied to the embeddings
    if set(missing) - tied:
        raise RuntimeError(f"{path} lacks {sorted(set(missing) - tied)[:5]}")
