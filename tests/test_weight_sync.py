"""Weight pushes without vLLM: layer-aligned buckets, the ZeRO-3-style streaming contract, and the vLLM engine's
state machine, version stamps, validation and deadlines driven through a fake adapter (the real engine is tested
in test_vllm_engine.py)."""

import gc
import logging
import time
import weakref

import pytest
import torch

from rollouts.engine import SamplingParams
from rollouts.engine_state import EngineError, EngineState, EngineStateError
from rollouts.weights import WeightCheck, layer_key, weight_buckets


def test_layer_key():
    assert layer_key("model.layers.7.self_attn.q_proj.weight") == "model.layers.7"
    assert layer_key("model.layers.12.mlp.experts.3.w1.weight") == "model.layers.12"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"


def _stream(layers=3, per_layer=2, numel=256):
    yield "model.embed_tokens.weight", torch.zeros(numel)
    for i in range(layers):
        for j in range(per_layer):
            yield f"model.layers.{i}.p{j}.weight", torch.zeros(numel)
    yield "model.norm.weight", torch.zeros(numel)


def test_buckets_are_bounded_and_never_split_a_layer():
    layer_bytes = 2 * 256 * 4
    buckets = list(weight_buckets(_stream(), max_bytes=layer_bytes + 10))
    names = [[n for n, _ in b] for b in buckets]
    assert sum(len(b) for b in names) == 8
    for b in names:
        keys = [layer_key(n) for n in b]
        for k in set(keys):  # every layer present in a bucket is there in full
            assert keys.count(k) == (2 if k.startswith("model.layers") else 1)
        assert sum(256 * 4 for _ in b) <= layer_bytes + 10 or len(set(keys)) == 1
    # a large budget gives one bucket; a budget below one layer still keeps the layer whole
    assert len(list(weight_buckets(_stream(), 1 << 30))) == 1
    tiny = list(weight_buckets(_stream(), 1))
    assert [len(b) for b in tiny] == [1, 2, 2, 2, 1]


def test_non_contiguous_layer_is_an_error():
    stream = [("model.layers.0.a", torch.zeros(2)), ("model.layers.1.a", torch.zeros(2)),
              ("model.layers.0.b", torch.zeros(2))]
    with pytest.raises(ValueError, match="weights of 'model.layers.0' are not contiguous"):
        list(weight_buckets(stream, 1 << 20))


def test_streaming_keeps_at_most_a_bucket_alive_and_survives_repartitioning():
    """A ZeRO-3-like source: gathers each layer into fresh tensors, yields them, and on resuming 'repartitions'
    (param.data = empty), as GatheredParameters does on exit. Buckets keep their data; at most one bucket + one layer
    of gathered tensors is alive at a time."""
    alive, peak = set(), [0]
    holders = {}

    def gathered_layers(n_layers=8, numel=1000):
        for i in range(n_layers):
            params = {}
            for j in range(2):
                p = torch.nn.Parameter(torch.full((numel,), float(i)), requires_grad=False)
                key = (i, j)
                alive.add(key)
                weakref.finalize(p.untyped_storage(), alive.discard, key)  # fires when the memory is freed
                params[f"model.layers.{i}.p{j}.weight"] = p
            peak[0] = max(peak[0], len(alive))
            for name, p in params.items():
                holders[name] = p
                yield name, p.data
            for p in params.values():  # "exit GatheredParameters": the parameter's data is released
                p.data = torch.empty(0)

    received = []
    layer_bytes = 2 * 1000 * 4
    for bucket in weight_buckets(gathered_layers(), max_bytes=2 * layer_bytes):
        for name, t in bucket:
            assert t.numel() == 1000 and float(t[0]) == float(name.split(".")[2])  # still the gathered values
            received.append(name)
        del bucket, name, t
        gc.collect()
    assert len(received) == 16
    assert 4 <= peak[0] <= 2 * 3  # two layers per bucket + the layer being gathered, never all 8


def test_weight_check_names_the_tensor():
    check = WeightCheck({"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,)}, tied_embeddings=True)
    check("lm_head.weight", torch.zeros(10, 4))  # the tied LM head of state_dict() is accepted
    with pytest.raises(ValueError, match="'model.norm.weigth' is not a tensor .* did you mean 'model.norm.weight'"):
        check("model.norm.weigth", torch.zeros(4))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(2,\), the engine's model has \(4,\)"):
        check("model.norm.weight", torch.zeros(2))
    assert check.missing({"model.norm.weight"}) == ["model.embed_tokens.weight"]


# ------------------------------------------------------------------------------ VLLMEngine with a fake adapter
class FakeLLM:
    def __init__(self):
        self.loaded = []
        self.version = None
        self.calls = []
        self.hang = False
        self.fail = False


@pytest.fixture()
def fake_engine(monkeypatch, tiny_dir, tokenizer):
    from rollouts import vllm_adapter as vx
    from rollouts import vllm_engine

    llm = FakeLLM()

    def reload(llm_, weights):
        if llm_.hang:
            time.sleep(30)
        if llm_.fail:
            raise RuntimeError("kernel exploded")
        llm_.loaded.append([n for n, _ in weights])

    def generate(llm_, prompts, params, progress=False):
        return [[([5, 6, 2], [-0.1, -0.2, -0.3], "stop", llm_.version)] * p.n for p in params]

    class Params:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setattr(vx, "platform_facts", lambda: {"cpu": True, "sleep_mode": False})
    monkeypatch.setattr(vx, "create_llm", lambda *a, **k: llm)
    monkeypatch.setattr(vx, "reload_weights", reload)
    monkeypatch.setattr(vx, "generate", generate)
    monkeypatch.setattr(vx, "sampling_params", lambda **kw: Params(**kw))
    monkeypatch.setattr(vx, "reset_prefix_cache", lambda llm_: True)
    monkeypatch.setattr(vx, "set_weight_version", lambda llm_, v: setattr(llm_, "version", str(v)))
    monkeypatch.setattr(vx, "sleep", lambda llm_, level: llm_.calls.append(("sleep", level)))
    monkeypatch.setattr(vx, "wake_up", lambda llm_, tags: llm_.calls.append(("wake", tuple(tags))))
    engine = vllm_engine.VLLMEngine(tiny_dir, tokenizer, bucket_mb=0.05, push_timeout_s=1.0)
    return engine, llm


def test_push_streams_layer_buckets_and_stamps_versions(fake_engine, tiny_model):
    engine, llm = fake_engine
    assert engine.state is EngineState.AWAKE and llm.version == "0"
    engine.load_weights(tiny_model.state_dict().items(), version=7)
    names = [n for b in llm.loaded for n in b]
    assert names == list(tiny_model.state_dict().keys())  # all of them, in order, lm_head included
    assert len(llm.loaded) > 2  # several buckets at 50 KiB
    assert engine.weight_version == 7 and llm.version == "7"
    comps = engine.generate([[1, 2, 3], [1, 4]], SamplingParams(seed=0), n=2)
    assert [c.weight_version for c in comps] == [7] * 4
    engine.load_weights(tiny_model.state_dict().items())
    assert engine.weight_version == 8


def test_sleep_is_refused_for_pushes_and_a_noop_on_cpu(fake_engine, tiny_model, caplog):
    engine, llm = fake_engine
    with caplog.at_level(logging.INFO, logger="rollouts"):
        engine.sleep()
    assert engine.state is EngineState.ASLEEP and llm.calls == []  # CPU: only the state moves
    assert "no sleep mode on this platform" in caplog.text
    with pytest.raises(EngineStateError, match="cannot load weights while asleep; call wake_weights"):
        engine.load_weights(tiny_model.state_dict().items())
    with pytest.raises(EngineStateError, match="cannot generate while asleep"):
        engine.generate([[1]], SamplingParams())
    engine.wake_weights()
    assert engine.state is EngineState.WEIGHTS_ONLY
    with pytest.raises(EngineStateError, match="re-allocate the KV cache"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(tiny_model.state_dict().items())  # allowed with weights awake
    engine.wake()
    assert engine.state is EngineState.AWAKE


def test_gpu_wakes_weights_before_kv_cache_and_level2_needs_a_push(fake_engine, tiny_model):
    engine, llm = fake_engine
    engine.sleep_supported, engine.sleep_level = True, 2
    engine.sleep()
    engine.wake()
    assert llm.calls == [("sleep", 2), ("wake", ("weights",)), ("wake", ("kv_cache",))]
    with pytest.raises(EngineStateError, match="discarded its weights"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(tiny_model.state_dict().items())
    assert len(engine.generate([[1]], SamplingParams())) == 1


def test_bad_tensor_is_refused_before_sending(fake_engine, tiny_model):
    engine, llm = fake_engine
    sd = dict(tiny_model.state_dict())
    sd["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(EngineError, match=r"'model.norm.weight' has shape \(3,\).* bucket\(s\) were already loaded"):
        engine.load_weights(sd.items())
    assert engine.state is EngineState.STALE  # earlier buckets went in
    with pytest.raises(EngineStateError, match="push stopped half-way"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(tiny_model.state_dict().items())  # a complete push recovers
    assert engine.state is EngineState.AWAKE
    with pytest.raises(EngineError, match="nothing was sent"):
        engine.load_weights([("model.embed_tokens.weight", torch.zeros(1))])
    assert engine.state is EngineState.AWAKE


def test_failing_or_hanging_push_raises_and_breaks_the_engine(fake_engine, tiny_model):
    engine, llm = fake_engine
    llm.hang = True
    t0 = time.time()
    with pytest.raises(EngineError, match=r"failed at bucket 1 .*did not return within 1 s.*restart the run"):
        engine.load_weights(tiny_model.state_dict().items())
    assert time.time() - t0 < 10
    assert engine.state is EngineState.BROKEN
    with pytest.raises(EngineStateError, match="it is broken"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(EngineStateError, match="it is broken"):
        engine.load_weights(tiny_model.state_dict().items())


def test_failing_push_names_the_bucket(fake_engine, tiny_model):
    engine, llm = fake_engine
    llm.fail = True
    with pytest.raises(EngineError, match=r"bucket 1 \(model.embed_tokens.weight … .*RuntimeError: kernel exploded"):
        engine.load_weights(tiny_model.state_dict().items())
    assert engine.state is EngineState.BROKEN


@pytest.mark.parametrize("options, match", [
    ({"dtype": "bfloat16"}, "engine.options.dtype: set `model.dtype` instead"),
    ({"logprobs_mode": "processed_logprobs"}, "needs 'raw_logprobs'"),
])
def test_engine_options_that_align_sets_itself_are_refused(options, match):
    from rollouts import vllm_adapter as vx

    with pytest.raises(ValueError, match=match):
        vx.create_llm("m", dtype="float32", seed=0, max_model_len=None, enforce_eager=True, enable_sleep_mode=False,
                      extra=dict(options))
