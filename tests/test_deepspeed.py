"""DeepSpeed ZeRO backend: config generation and precedence (fast), and real 2-process CPU runs (gloo) compared
with the single-process torch backend on the same global batches.

Tolerance of the trajectory comparisons: fp32 throughout, the same formulas and the same global normalisation, so
the only differences are the order of floating-point sums (each rank's micro-batches are different slices of the
batch, padded to different lengths, and DeepSpeed sums gradients across ranks in buckets). Those are ~1e-7 relative
per step (measured: ≤ 5e-7 on losses and gradient norms over 6 steps). We assert rtol 1e-5 on losses / gradient norms
and atol 1e-4 on final parameters (Adam's m/√v normalises tiny gradients, so a parameter whose gradient is ~0 can move
by up to lr · steps in either run) — far below what a wrong factor (1/W, 1/GAS, a missing rank) gives: ≥ 1e-2.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import arith_rows, tiny_config, write_jsonl

from align import dsconfig
from align.config import load_config, pipeline_from_dict
from align.configio import ConfigError
from align.trainer import Trainer
from rollouts.sources import DatasetSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
ZERO2 = os.path.join(REPO, "examples", "ds_zero2.json")
ZERO3 = os.path.join(REPO, "examples", "ds_zero3.json")
ZERO3_OFFLOAD = os.path.join(REPO, "examples", "ds_zero3_offload.json")
WORLD = 2


# ----------------------------------------------------------------------------------------------- config (fast)
def cfg_of(tmp_path, **sections):
    data = tiny_config(tmp_path, **sections)
    return pipeline_from_dict(data).stages[0].config


def test_generated_config_is_ours(tmp_path):
    cfg = cfg_of(tmp_path, train={"batch_size": 8, "micro_batch_size": 3, "grad_clip": 0.7},
                 backend={"name": "deepspeed", "zero_stage": 2, "deepspeed_config": ZERO2, "precision": "bf16"})
    ds = dsconfig.build(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.7 and ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    # 8 examples over 2 ranks = 4 each, micro-batches of 3 → 2 accumulation steps; batch keys stay consistent
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    assert ds["managed_gradient_accumulation"] is False  # the trainer owns the boundary: no division by GAS
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # "auto" from the tiny model's hidden size
    assert ds["zero_optimization"]["overlap_comm"] is True  # the JSON's own keys pass through


def test_stage0_fp32_clips_in_align(tmp_path):
    cfg = cfg_of(tmp_path, backend={"name": "deepspeed", "zero_stage": 0})
    assert dsconfig.build(cfg, 2)["gradient_clipping"] == 0.0  # GuardedAdamW clips (and skips NaN) instead


def write_json(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("user, match", [
    ({"gradient_clipping": 0.5}, r'"gradient_clipping" is 0.5, but align sets it to 1.0 from train.grad_clip; '
                                 r"align's config wins for this key"),
    ({"zero_optimization": {"stage": 3}}, r'"zero_optimization.stage" is 3, but align sets it to 2 from '
                                          r"backend.zero_stage"),
    ({"train_micro_batch_size_per_gpu": 16}, r"from train.micro_batch_size"),
    ({"bf16": {"enabled": True}}, r'"bf16.enabled" is True, but align sets it to False from backend.precision'),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     r"align sets it from backend.offload_optimizer, which leaves it off"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, r'remove the "optimizer" section; align builds AdamW'),
    ({"scheduler": {"type": "WarmupLR"}}, r'remove the "scheduler" section'),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": "auto"}},
     r'"zero_optimization.allgather_bucket_size" is "auto", which align fills only for'),
])
def test_conflicting_json_key_is_an_error_naming_the_winner(tmp_path, user, match):
    path = write_json(tmp_path, user)
    data = tiny_config(tmp_path, backend={"name": "deepspeed", "zero_stage": 2, "deepspeed_config": path})
    with pytest.raises(ConfigError, match=match):
        pipeline_from_dict(data)  # checked when the config loads, before any model


def test_equal_or_auto_values_are_accepted(tmp_path):
    path = write_json(tmp_path, {"gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                                 "train_batch_size": "auto", "bf16": {"enabled": False}})
    pipeline_from_dict(tiny_config(tmp_path, backend={"name": "deepspeed", "zero_stage": 2, "deepspeed_config": path}))


@pytest.mark.parametrize("backend, match", [
    ({"zero_stage": 3}, r"backend.zero_stage=3 needs backend.name: deepspeed"),
    ({"offload_optimizer": True}, r"needs backend.name: deepspeed"),
    ({"name": "deepspeed", "zero_stage": 2, "offload_params": True}, r"offload_params needs backend.zero_stage: 3"),
    ({"name": "deepspeed", "zero_stage": 0, "offload_optimizer": True}, r"offload_optimizer needs backend.zero_stage 1, 2 or 3"),
    ({"name": "deepspeed", "zero_stage": 5}, r"backend.zero_stage: 5 is not one of 0, 1, 2, 3"),
    ({"name": "deepspeed", "deepspeed_config": "nope.json"}, r"backend.deepspeed_config: no such file 'nope.json'"),
    ({"name": "deepspeed", "zero_stage": 1, "deepspeed_config": "OVERLAP"}, r"overlap_comm.* needs backend.zero_stage 2 or 3"),
])
def test_backend_options_are_checked_before_any_model_loads(tmp_path, backend, match):
    if backend.get("deepspeed_config") == "OVERLAP":
        backend = {**backend, "deepspeed_config": write_json(tmp_path, {"zero_optimization": {"overlap_comm": True}})}
    with pytest.raises(ConfigError, match=match):
        pipeline_from_dict(tiny_config(tmp_path, backend=backend))


def test_model_dtype_must_agree_with_precision(tmp_path):
    with pytest.raises(ConfigError, match=r"model.dtype='float16' conflicts with backend.precision='bf16'"):
        pipeline_from_dict(tiny_config(tmp_path, model={"dtype": "float16"},
                                       backend={"name": "deepspeed", "precision": "bf16"}))


def test_torch_backend_refuses_several_processes(tmp_path):
    cfg = cfg_of(tmp_path)
    with pytest.raises(ConfigError, match=r"launched as 2 processes, but backend.name is torch"):
        dsconfig.check(cfg, world_size=2)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON \(line 1"):
        load_config(None, ["data.train=x.jsonl", "backend.name=deepspeed", f"backend.deepspeed_config={path}"])


def test_example_yaml_loads():
    pipe = load_config(os.path.join(REPO, "examples", "zero3_sft.yaml"))
    b = pipe.stages[0].config.backend
    assert (b.name, b.zero_stage, b.deepspeed_config) == ("deepspeed", 3, "examples/ds_zero3.json")


def test_resume_refuses_a_mismatched_checkpoint(tmp_path):
    from types import SimpleNamespace

    from align.checkpoint import CheckpointError
    from align.deepspeed_backend import DeepSpeedBackend

    me = SimpleNamespace(stage=3, world_size=2)
    with pytest.raises(CheckpointError, match=r"written by the torch backend; resume it with that backend"):
        DeepSpeedBackend.load_state_dict(me, {"optimizer": {}}, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"written with world_size=4, this run has world_size=2; resume with the same"):
        DeepSpeedBackend.load_state_dict(me, {"backend": "deepspeed", "zero_stage": 3, "world_size": 4}, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"has no deepspeed/ folder"):
        DeepSpeedBackend.load_state_dict(me, {"backend": "deepspeed", "zero_stage": 3, "world_size": 2}, str(tmp_path))


def test_agreed_chunk_count_gives_the_same_logprobs(tiny_model):
    """Extra (empty) LM-head chunks, which keep ZeRO-3 ranks in step, change nothing."""
    from align.head import forward_logprobs

    torch.manual_seed(0)
    ids = torch.randint(3, 50, (3, 9))
    att = torch.ones(3, 9, dtype=torch.bool)
    mask = torch.rand(3, 9) > 0.4
    _, a, _ = forward_logprobs(tiny_model, ids, att, mask, chunk_tokens=4)
    _, b, _ = forward_logprobs(tiny_model, ids, att, mask, chunk_tokens=4, n_chunks=9)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot hold"):
        forward_logprobs(tiny_model, ids, att, mask, chunk_tokens=1, n_chunks=2)


# ------------------------------------------------------------------------------------- 2 processes (gloo, CPU)
def torchrun(jobs: list[dict], workdir, timeout=900) -> None:
    path = os.path.join(workdir, f"jobs-{len(os.listdir(workdir))}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           os.path.join(TESTS, "ds_worker.py"), path]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        errors = [open(f"{path}.rank{r}.err").read() for r in range(WORLD) if os.path.exists(f"{path}.rank{r}.err")]
        raise AssertionError(f"torchrun failed ({out.returncode}):\n" + "\n".join(errors) + out.stderr[-3000:])


def base_config(root, name, *, loss="sft", stage=2, steps=6, json_path=None, backend=None, train=None, model=None,
                **sections):
    rows = write_jsonl(os.path.join(root, "train17.jsonl"), arith_rows(17))
    data = tiny_config(os.path.join(root, name), data={"train": rows, "max_length": 48},
                       loss=loss if isinstance(loss, dict) else {"name": loss},
                       # 17 rows in batches of 8: the third batch has one example, so one rank gets none;
                       # micro-batches of 3: ranks hold 4 examples (2 micro-batches) or 3/1 (1), so plans differ
                       train={"steps": steps, "batch_size": 8, "micro_batch_size": 3, "lr": 2e-3, "warmup_steps": 1,
                              **(train or {})},
                       model={"chunk_tokens": 4, **(model or {})},
                       backend={"name": "deepspeed", "zero_stage": stage,
                                "deepspeed_config": json_path or (ZERO3 if stage == 3 else ZERO2 if stage == 2 else None),
                                **(backend or {})},
                       **sections)
    if data["backend"]["deepspeed_config"] is None:
        del data["backend"]["deepspeed_config"]
    return data


def as_torch(data: dict) -> dict:
    data = json.loads(json.dumps(data))
    data["backend"] = {"name": "torch"}
    data["run_dir"] = data["run_dir"] + "-torch"
    return data


def metrics(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def final_state(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final")).state_dict()


def run_torch(data: dict) -> Trainer:
    pipe = pipeline_from_dict(data)
    t = Trainer(pipe.stages[0].config, pipe.run_dir)
    t.fit()
    return t


EVAL = {"prompts": None, "max_new_tokens": 4, "limit": 4, "before": True}


def with_pairs(root, data: dict) -> dict:
    """The same run on 17 preference pairs (arithmetic questions, a wrong answer rejected)."""
    rows = [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": [{"role": "assistant", "content": r["completion"][0]["content"] + "1"}]} for r in arith_rows(17)]
    data["data"]["train"] = write_jsonl(os.path.join(root, "pairs17.jsonl"), rows)
    return data


def jobs_for(root):
    """name → (DeepSpeed job, torch reference config or None)."""
    os.makedirs(root, exist_ok=True)
    prompts = write_jsonl(os.path.join(root, "prompts.jsonl"),
                          [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}], "answer": str(2 * i)}
                           for i in range(4)])
    eval_cfg = {**EVAL, "prompts": prompts}
    specs = {
        "sft-z0": base_config(root, "sft-z0", stage=0),
        "sft-z1": base_config(root, "sft-z1", stage=1),
        "sft-z2": base_config(root, "sft-z2", stage=2),
        # eval under ZeRO-3: every rank generates (gathers are collective); a checkpoint mid-run (distributed save)
        "sft-z3": base_config(root, "sft-z3", stage=3, eval=eval_cfg, train={"save_every": 3}),
        "refkl-z2": base_config(root, "refkl-z2", stage=2, loss={"name": "ds_losses:RefKLPenalty", "beta": 0.5}),
        "refkl-z3": base_config(root, "refkl-z3", stage=3, loss={"name": "ds_losses:RefKLPenalty", "beta": 0.5}),
        "ratio-z2": base_config(root, "ratio-z2", stage=2, steps=4, loss={"name": "ds_losses:ClippedRatio"}),
        "ratio-z3": base_config(root, "ratio-z3", stage=3, steps=4, loss={"name": "ds_losses:ClippedRatio"}),
        "fullkl-z3": base_config(root, "fullkl-z3", stage=3, steps=3, loss={"name": "ds_losses:FullVocabKL"}),
        # DPO: pairs stay whole on a rank; reference log-probs precomputed collectively before training, cached
        "dpo-z3": with_pairs(root, base_config(root, "dpo-z3", stage=3, steps=4, loss={"name": "dpo", "beta": 0.5})),
        # NaN on the first example of the second global batch: rank 0 holds it, rank 1 does not
        **{f"nan-z{z}": base_config(root, f"nan-z{z}", stage=z, steps=4, loss={
            "name": "ds_losses:NaNOnOneRow", "row": DatasetSource([None] * 17, 8)._order[8]}) for z in (0, 2, 3)},
        # bf16 mixed precision (DeepSpeed keeps fp32 master weights): close to fp32, exported in bf16
        "bf16-z3": base_config(root, "bf16-z3", stage=3, backend={"precision": "bf16"}),
        "offload-z3": base_config(root, "offload-z3", stage=3, json_path=ZERO3_OFFLOAD,
                                  backend={"offload_optimizer": True, "offload_params": True, "cpu_adam": False}),
        # LoRA (align/lora.py): only the adapters in the optimizer; DPO's reference = the policy with adapters off,
        # precomputed through the policy's own ZeRO-3 engine
        "lora-z2": base_config(root, "lora-z2", stage=2, peft=LORA),
        "lora-dpo-z3": with_pairs(root, base_config(root, "lora-dpo-z3", stage=3, steps=4, peft=LORA,
                                                    loss={"name": "dpo", "beta": 0.5})),
    }
    jobs = [{"name": k, "config": v} for k, v in specs.items()]
    for job in jobs:
        if job["name"] in ("sft-z0", "sft-z3"):
            job["memory"] = os.path.join(root, f"memory-{job['name']}.json")
        if job["name"] == "sft-z3":
            job["dump_weights"] = os.path.join(root, "weights-z3.pt")
        if job["name"] == "lora-dpo-z3":  # the merged W + s·BA stream, gathered module by module
            job["dump_weights"] = os.path.join(root, "weights-lora-z3.pt")
        if job["name"] == "refkl-z3":
            job["reference_pass"] = os.path.join(root, "reference-pass")
    # the first half of a ZeRO-3 run; a second torchrun resumes it (test_zero3_resume_continues_identically)
    resume = base_config(root, "resume-z3", stage=3, eval=eval_cfg, train={"save_every": 3})
    jobs.append({"name": "resume-z3-first-half", "config": resume, "max_steps": 3})
    jobs.append({"name": "lora-resume-z2-first-half", "config": lora_resume_config(root), "max_steps": 3})
    return jobs, specs, resume


LORA = {"r": 4, "alpha": 8}


def lora_resume_config(root):
    return base_config(root, "lora-resume-z2", stage=2, peft=LORA, train={"save_every": 3})


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zero"))
    jobs, specs, resume = jobs_for(root)
    torchrun(jobs, root)
    return root, specs, resume


@pytest.fixture(scope="module")
def torch_runs(zero_runs):
    _, specs, _ = zero_runs
    sys.path.insert(0, TESTS)
    # one torch run serves every sft job (their configs differ only in backend, run_dir, eval and save_every)
    sft = as_torch(specs["sft-z3"])
    run_torch(sft)
    out = {}
    for name, data in specs.items():
        if name.startswith(("sft-", "offload-", "bf16-")):
            out[name] = sft["run_dir"]
        elif name.startswith("nan-") and name != "nan-z0":
            out[name] = out["nan-z0"]  # the nan jobs differ only in the stage
        else:
            out[name] = as_torch(data)["run_dir"]
            run_torch(as_torch(data))
    return out


def assert_same_trajectory(ds_dir, torch_dir, steps=None, rtol=1e-5):
    a, b = metrics(ds_dir), metrics(torch_dir)
    n = steps or len(b)
    assert len(a) >= n and len(b) >= n, (len(a), len(b))
    for ra, rb in zip(a[:n], b[:n]):
        assert ra["step"] == rb["step"]
        assert ra["skipped"] == rb["skipped"], (ra, rb)
        assert ra["loss_tokens"] == rb["loss_tokens"] and ra["sequences"] == rb["sequences"]
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
        if rb["skipped"]:
            continue
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rtol), (ra["step"], ra["loss"], rb["loss"])
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=rtol), (ra["step"], ra["grad_norm"], rb["grad_norm"])
    return a, b


def assert_same_weights(ds_dir, torch_dir):
    ours, ref = final_state(ds_dir), final_state(torch_dir)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-4)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sft_trajectory_matches_one_process(zero_runs, torch_runs, stage):
    root, specs, _ = zero_runs
    name = f"sft-z{stage}"
    a, b = assert_same_trajectory(specs[name]["run_dir"], torch_runs[name])
    assert len(a) == 6
    # the third batch had one example: one rank ran only weight-0 placeholder micro-batches
    assert a[2]["sequences"] == 1
    assert_same_weights(specs[name]["run_dir"], torch_runs[name])


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_evaluation_matches_one_process(zero_runs, torch_runs):
    root, specs, _ = zero_runs
    a, b = metrics(specs["sft-z3"]["run_dir"], "eval"), metrics(torch_runs["sft-z3"], "eval")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["mean_length"] == rb["mean_length"] and ra["accuracy"] == rb["accuracy"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["refkl-z2", "refkl-z3"])
def test_reference_logprobs_under_zero(zero_runs, torch_runs, name):
    """ref_logprobs from a frozen reference (ZeRO-3: a sharded inference engine) give the torch trajectory, and at
    step 1 the policy equals the reference (k3 = 0)."""
    root, specs, _ = zero_runs
    a, _ = assert_same_trajectory(specs[name]["run_dir"], torch_runs[name])
    assert abs(a[0]["k3"]) < 1e-6 and a[-1]["k3"] > 1e-4


@pytest.mark.distributed
@pytest.mark.slow
def test_dpo_with_precomputed_reference_under_zero3(zero_runs, torch_runs):
    """Every rank runs the same precompute pass (collective gathers), rank 0 writes the cache; the DPO trajectory is
    one process's, starting at log 2 (policy = reference)."""
    root, specs, _ = zero_runs
    run = specs["dpo-z3"]["run_dir"]
    a, _ = assert_same_trajectory(run, torch_runs["dpo-z3"])
    assert a[0]["loss"] == pytest.approx(0.6931472, abs=1e-6) and a[-1]["loss"] < a[0]["loss"]
    assert len(os.listdir(os.path.join(run, "ref_logprobs"))) == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_a_model_loaded_later_runs_sharded_under_zero3(zero_runs):
    """A frozen model loaded after setup under ZeRO-3 (as a reference-precompute pass does) comes out of
    from_pretrained as shards; backend.forward gives it an inference engine and its log-probs equal one process's,
    with the ranks holding 3 and 2 examples (different LM-head chunk counts, agreed)."""
    from align.collate import collate
    from align.config import ModelConfig
    from align.data import load_examples
    from align.models import load_model, load_tokenizer

    root, specs, _ = zero_runs
    cfg = pipeline_from_dict(specs["refkl-z3"]).stages[0].config
    init = os.path.join(cfg.run_dir, "init-model")
    model = load_model(init, ModelConfig(name=init), torch.device("cpu"))
    tok = load_tokenizer(init)
    examples = load_examples(cfg.data.train, tok, cfg.data, progress=False)[0][:5]
    from align.head import forward_logprobs

    for rank in range(WORLD):
        got = torch.load(os.path.join(root, f"reference-pass.rank{rank}"))
        batch, _ = collate(examples[rank::WORLD], tok.pad_token_id)
        assert torch.equal(batch.extras["index"], got["index"])
        with torch.no_grad():
            _, want, _ = forward_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                          chunk_tokens=cfg.model.chunk_tokens)
        assert float(batch.loss_mask.sum()) > 0
        torch.testing.assert_close(got["logprobs"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ratio-z2", "ratio-z3"])
def test_old_policy_logprobs_under_zero(zero_runs, torch_runs, name):
    """old_logprobs are the policy's own log-probs before the update phase: the first pass has ratio 1 exactly as in
    one process, the second sees the moved policy; trajectories match."""
    root, specs, _ = zero_runs
    a, b = assert_same_trajectory(specs[name]["run_dir"], torch_runs[name])
    assert a[0]["ratio"] == pytest.approx(1.0, abs=1e-6)  # epoch 1 of batch 1: π_θ = π_old
    assert abs(a[1]["ratio"] - 1.0) > 1e-4  # epoch 2: π_θ has moved


@pytest.mark.distributed
@pytest.mark.slow
def test_full_vocabulary_reference_kl_under_zero3(zero_runs, torch_runs):
    """ctx.ref_kl() (needs "ref_model") with LM-head chunks of 4 tokens: ranks with fewer loss tokens make extra empty
    chunk calls so ZeRO-3's gathers stay in step; trajectory matches one process."""
    root, specs, _ = zero_runs
    a, _ = assert_same_trajectory(specs["fullkl-z3"]["run_dir"], torch_runs["fullkl-z3"])
    assert abs(a[0]["kl"]) < 1e-6 and a[-1]["kl"] > 1e-6


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(zero_runs, torch_runs, stage):
    """The NaN is a constant added to one rank's loss (its gradient is finite): the ranks agree to skip, the NaN-
    poisoned gradient makes DeepSpeed (stage 0: GuardedAdamW) drop the update and its buffers everywhere, and training
    continues as in one process."""
    root, specs, _ = zero_runs
    name = f"nan-z{stage}"
    a, _ = assert_same_trajectory(specs[name]["run_dir"], torch_runs[name])
    assert [r["skipped"] for r in a] == [0.0, 1.0, 0.0, 0.0]
    assert_same_weights(specs[name]["run_dir"], torch_runs[name])


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_with_cpu_offload_matches_one_process(zero_runs, torch_runs):
    root, specs, _ = zero_runs
    assert_same_trajectory(specs["offload-z3"]["run_dir"], torch_runs["offload-z3"])


@pytest.mark.distributed
@pytest.mark.slow
def test_consolidated_export_equals_gathered_parameters(zero_runs):
    """final/ (written by rank 0 from the layer-by-layer gather) equals DeepSpeed's own consolidation of the ZeRO-3
    shards and our named_weights(), and loads with from_pretrained here, in another process than the writer."""
    root, specs, _ = zero_runs
    dump = torch.load(os.path.join(root, "weights-z3.pt"))
    exported = final_state(specs["sft-z3"]["run_dir"])
    ours, oracle = dump["named_weights"], dump["deepspeed"]
    assert sorted(ours) == sorted(exported)  # state_dict names, tied LM head included
    for k, v in oracle.items():
        assert torch.equal(v, ours[k]), k
    for k, v in exported.items():
        assert torch.equal(v, ours[k]), k


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_halves_parameter_and_optimizer_bytes(zero_runs):
    """Measured on each rank after training: ZeRO-3 over 2 ranks holds ~1/2 of stage 0's parameter and optimizer-state
    bytes (exactly 1/2 up to partition padding and the few small parameters ZeRO-3 keeps whole). Gradients mid-step,
    all four stages and bf16: benchmarks/zero_memory.py."""
    root, _, _ = zero_runs
    z0 = json.load(open(os.path.join(root, "memory-sft-z0.json")))
    z3 = json.load(open(os.path.join(root, "memory-sft-z3.json")))
    assert len(z0) == len(z3) == WORLD
    for r0, r3 in zip(z0, z3):
        p = r3["params"] / r0["params"]
        o = r3["optimizer_states"] / r0["optimizer_states"]
        print(f"ZeRO-3 / stage 0 per rank: params {p:.3f}, optimizer states {o:.3f}; fp32 master partition "
              f"{r3['master_weights'] / r0['params']:.3f} of the parameters (stage 0 steps on the model's own)")
        assert 0.45 <= p <= 0.55, p
        assert 0.45 <= o <= 0.55, o
        # DeepSpeed keeps an fp32 partition of 1/W of the parameters for its optimizer even in fp32 training
        assert r0["master_weights"] == 0 and 0.45 <= r3["master_weights"] / r0["params"] <= 0.55


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_resume_continues_identically(zero_runs):
    """3 steps, stop (checkpoint: consolidated model/ + every rank's DeepSpeed shards), new processes resume and run 3
    more: the same losses and final weights as the uninterrupted sft-z3 run, bit for bit."""
    root, specs, resume = zero_runs
    run_dir = resume["run_dir"]
    from align.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.endswith("step-00000003")
    shards = sorted(os.listdir(os.path.join(ckpt, "deepspeed", "state")))
    assert sum("optim_states" in s for s in shards) == WORLD, shards
    torchrun([{"name": "resume-z3-second-half", "config": resume}], root)
    straight = metrics(specs["sft-z3"]["run_dir"])
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    a, b = final_state(run_dir), final_state(specs["sft-z3"]["run_dir"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_mixed_precision_under_zero3(zero_runs, torch_runs):
    """bf16 weights and activations with fp32 master weights: the fp32 trajectory to bf16 rounding (2^-8 relative per
    operation; 2e-2 on the loss over 6 steps), and a bf16 Hugging Face export that loads."""
    root, specs, _ = zero_runs
    a, b = metrics(specs["bf16-z3"]["run_dir"]), metrics(torch_runs["bf16-z3"])
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=2e-2)
    assert a[0]["loss"] != b[0]["loss"]  # it really ran in bf16
    exported = final_state(specs["bf16-z3"]["run_dir"])
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not fp16_supported(), reason="DeepSpeed reports fp16 unsupported on this device (CPU without "
                                                  "fp16 kernels); runs on GPUs")
def test_fp16_with_loss_scaling_under_zero2(tmp_path):
    """fp16 needs DeepSpeed's dynamic loss scaling: overflowing steps are skipped and counted, the rest train."""
    data = base_config(str(tmp_path), "fp16-z2", stage=2, backend={"precision": "fp16"})
    torchrun([{"name": "fp16-z2", "config": data}], str(tmp_path))
    rows = metrics(data["run_dir"])
    assert len(rows) == 6
    applied = [r for r in rows if not r["skipped"]]
    assert applied and all(r["loss"] == r["loss"] for r in applied)


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_under_the_deepspeed_launcher(tmp_path):
    """The README's command: `deepspeed --no_local_rank --module align.cli train examples/zero3_sft.yaml` (2 processes,
    shortened). Rank 0 alone reports and writes; the run directory is complete."""
    import shutil

    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not on PATH")
    rows = write_jsonl(tmp_path / "train.jsonl", arith_rows(16))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+1?", "answer": "2"}] * 2)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    cmd = [launcher, "--num_gpus", str(WORLD), "--no_local_rank", "--module", "align.cli", "train",
           "examples/zero3_sft.yaml", f"run_dir={run_dir}", f"data.train={rows}", f"eval.prompts={prompts}",
           "train.steps=2", "train.batch_size=4", "train.micro_batch_size=2", "model.tiny.hidden_size=64",
           "model.tiny.num_layers=1", "model.tiny.num_heads=1", "model.tiny.intermediate_size=128",
           "log.progress=false", "log.plots=false", "log.tensorboard=false"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(f"run directory: {run_dir}") == 1  # rank 0 reports, rank 1 stays quiet
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert os.path.isfile(run_dir / "final" / "model.safetensors")
    assert json.load(open(run_dir / "summary.json"))["steps"] == 2


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora-z2", "lora-dpo-z3"])
def test_lora_under_zero_matches_one_process(zero_runs, torch_runs, name):
    """LoRA at ZeRO-2 (sft) and ZeRO-3 (dpo, reference = disabled adapters, precomputed collectively): the trajectory
    and the saved adapter of one process."""
    from safetensors.torch import load_file

    root, specs, _ = zero_runs
    run = specs[name]["run_dir"]
    a, _ = assert_same_trajectory(run, torch_runs[name])
    if name.startswith("lora-dpo"):
        assert a[0]["loss"] == pytest.approx(0.6931472, abs=1e-6) and a[-1]["loss"] < a[0]["loss"]
    ours = load_file(os.path.join(run, "final", "adapter_model.safetensors"))
    ref = load_file(os.path.join(torch_runs[name], "final", "adapter_model.safetensors"))
    assert sorted(ours) == sorted(ref) and ours
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-4)
    assert not os.path.exists(os.path.join(run, "final", "model.safetensors"))  # the adapter only


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_merged_weights_under_zero3(zero_runs):
    """backend.named_weights() of a LoRA policy under ZeRO-3 (what a vLLM push receives): the base model's names, each
    W + s·BA equal to peft's merge of the saved adapter."""
    from align.config import ModelConfig
    from align.models import load_model

    root, specs, _ = zero_runs
    run = specs["lora-dpo-z3"]["run_dir"]
    ours = torch.load(os.path.join(root, "weights-lora-z3.pt"))["named_weights"]
    merged = load_model(os.path.join(run, "final"), ModelConfig(), torch.device("cpu")).state_dict()
    base = load_model(os.path.join(run, "init-model"), ModelConfig(), torch.device("cpu")).state_dict()
    assert sorted(ours) == sorted(base)
    for k, v in merged.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6)
    assert any(not torch.equal(ours[k], base[k]) for k in base)


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_resume_under_zero2(zero_runs):
    """A LoRA ZeRO-2 run stopped at step 3 (checkpoint: the adapter folder + DeepSpeed state without the frozen base)
    and resumed in new processes ends with the uninterrupted run's losses and adapter, bit for bit."""
    from safetensors.torch import load_file

    root, specs, _ = zero_runs
    cfg = lora_resume_config(root)
    from align.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(cfg["run_dir"])
    assert ckpt.endswith("step-00000003") and os.path.isfile(os.path.join(ckpt, "model", "adapter_model.safetensors"))
    torchrun([{"name": "lora-resume-z2-second-half", "config": cfg}], root)
    straight, resumed = metrics(specs["lora-z2"]["run_dir"]), metrics(cfg["run_dir"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = load_file(os.path.join(cfg["run_dir"], "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(specs["lora-z2"]["run_dir"], "final", "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
