"""Checks shared by the engine tests (HF and vLLM): the trainer's log-probs of completions, and the common structure."""

import torch

from align.head import decoder_hidden, token_logprobs
from rollouts.engine import Completion


@torch.no_grad()
def trainer_logprobs(model, completions: list[Completion]) -> list[list[float]]:
    """The trainer's fp32 log-probs (align.head.token_logprobs) of each completion's tokens given its prompt."""
    out = []
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(c.prompt_ids):] = True
        att = torch.ones_like(mask)
        lp, _ = token_logprobs(model, decoder_hidden(model, ids, att), ids, mask)
        out.append(lp[0, len(c.prompt_ids):].tolist())
    return out


def max_logprob_gap(model, completions: list[Completion]) -> float:
    gaps = [abs(a - b) for c, ref in zip(completions, trainer_logprobs(model, completions))
            for a, b in zip(c.logprobs, ref)]
    assert gaps, "no generated tokens to compare"
    return max(gaps)


def check_structure(comps: list[Completion], prompts: list[list[int]], n: int, eos_id: int, max_new: int) -> None:
    """The contract both engines keep: prompt-major order, n per prompt, one log-prob per token, EOS kept on stop."""
    assert len(comps) == len(prompts) * n
    assert [c.prompt_index for c in comps] == [i for i in range(len(prompts)) for _ in range(n)]
    for c in comps:
        assert isinstance(c, Completion)
        assert c.prompt_ids == prompts[c.prompt_index]
        assert all(isinstance(t, int) for t in c.token_ids) and all(isinstance(x, float) for x in c.logprobs)
        assert len(c.logprobs) == len(c.token_ids) <= max_new
        assert all(x <= 0 for x in c.logprobs)
        assert c.finish_reason in ("stop", "length") and isinstance(c.text, str) and isinstance(c.weight_version, int)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos_id and eos_id not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == max_new and eos_id not in c.token_ids
