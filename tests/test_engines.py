"""The transformers engine: log-probs equal the trainer's, seeded sampling is reproducible, the common structure,
and pushes into a separate copy. (The vLLM engine: test_vllm_engine.py.)"""

import copy

import pytest
import torch

from engine_checks import check_structure, max_logprob_gap
from rollouts.engine import SamplingParams
from rollouts.hf_engine import HFEngine

PROMPTS = [[1, 5, 20, 30, 6], [1, 5, 40, 6], [1, 5, 22, 23, 24, 25, 6]]


def test_hf_logprobs_equal_the_trainers(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer, batch_size=2)
    comps = engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=1), n=3)
    # raw temperature-1 log-probs even though sampling used temperature 0.7 / top-p 0.9 (left padding included)
    assert max_logprob_gap(tiny_model, comps) < 1e-4


def test_hf_structure_and_seeded_reproducibility(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer, batch_size=2)
    s = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3)
    a = engine.generate(PROMPTS, s, n=8)
    check_structure(a, PROMPTS, 8, tokenizer.eos_token_id, 24)
    assert {c.finish_reason for c in a} == {"stop", "length"}  # both endings are exercised
    state = torch.get_rng_state()
    b = engine.generate(PROMPTS, s, n=8)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched by seeded sampling
    other = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=24, seed=4), n=8)
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    u1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24), n=2)
    u2 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24), n=2)
    assert [c.token_ids for c in u1] != [c.token_ids for c in u2]  # unseeded calls advance the RNG


def test_hf_shared_engine_stamps_versions_and_copy_engine_loads(tiny_model, tokenizer):
    shared = HFEngine(tiny_model, tokenizer)
    assert not shared.copies_weights

    def never():
        raise AssertionError("a shared engine must not read the weight stream")
        yield

    shared.load_weights(never(), version=5)
    assert shared.weight_version == 5
    assert {c.weight_version for c in shared.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))} == {5}

    copy_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine = HFEngine(copy_model, tokenizer, shares_weights=False)
    assert engine.copies_weights
    engine.load_weights(tiny_model.state_dict().items())
    assert engine.weight_version == 1
    for (n, a), b in zip(tiny_model.state_dict().items(), copy_model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="'nope' is not a tensor"):
        engine.load_weights([("nope", torch.zeros(1))])
