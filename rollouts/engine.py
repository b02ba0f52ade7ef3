"""The generation-engine interface shared by the transformers and vLLM engines.

Log-prob convention: ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's raw
distribution (temperature 1, no top-p/top-k), the quantity the trainer recomputes, so the two can be compared.
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

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        """``n`` completions per prompt, prompt-major: completions of prompt 0 first."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (full, unsharded tensors in Hugging Face naming)."""

    def sleep(self) -> None: ...

    def wake(self) -> None: ...
