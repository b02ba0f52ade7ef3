"""The generation-engine interface shared by the transformers and vLLM engines.

Log-prob convention: ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's raw
distribution (temperature 1, no top-p/top-k), the quantity the trainer recomputes, so the two can be compared.

Weight versions: every push stamps a version (the trainer passes its optimizer step) and every completion records
the version it was sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    max_new_tokens: int = 64
    seed: int | None = None  # same seed, same prompts, same weights → same samples


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to generate()
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, up to and including EOS when the model stopped
    logprobs: list[float]  # raw-distribution log-prob of each generated token
    text: str  # decoded completion, special tokens removed
    finish_reason: str  # "stop" (EOS) or "length"
    weight_version: int = 0  # the engine's weight version when this was sampled
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    weight_version: int
    copies_weights: bool  # True: the engine has its own copy and needs pushes; False: it samples the policy itself

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        """``n`` completions per prompt, prompt-major: completions of prompt 0 first."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Replace the engine's weights from a lazy stream of full, unsharded tensors in Hugging Face naming, and
        stamp ``version`` (default: previous + 1)."""

    def sleep(self) -> None:
        """Free generation memory for the training phase (where the engine supports it)."""

    def wake_weights(self) -> None:
        """Bring the weights back (before a push), not yet the generation memory."""

    def wake(self) -> None:
        """Ready to generate."""
