"""The run configuration: one YAML file, typed dataclasses, a comment on every field.

A config is a mapping of sections (``model``, ``data``, ``loss``, ``train``, ``engine``, ``rollout``, ``eval``,
``reference``, ``backend``, ``log``, ``peft``). ``stages:`` turns it into a pipeline: every stage is the top-level config with
that stage's keys merged over it (a stage's ``loss`` replaces the top-level one), and starts from the previous
stage's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from . import stage_refs
from .configio import ConfigError, apply_override, deep_merge, from_dict, load_yaml, parse_override, suggest


@dataclass
class TinyModelConfig:
    """Shape of the random Llama-style model built offline when ``model.name: tiny``."""

    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 2  # transformer blocks
    num_heads: int = 2  # attention heads (head_dim 64 so vLLM's CPU backend accepts the model)
    head_dim: int = 64  # per-head width
    intermediate_size: int = 512  # MLP width
    max_position_embeddings: int = 512  # longest sequence the model accepts
    tie_word_embeddings: bool = True  # share the input embedding and the LM head


@dataclass
class ModelConfig:
    name: str = "tiny"  # a local folder, a hub id (when the network allows) or "tiny" (random model + char tokenizer)
    tokenizer: str | None = None  # tokenizer folder / hub id when it differs from `name`
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the weights and the forward pass
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust the repository
    attn_implementation: str | None = "sdpa"  # "sdpa", "eager", "flash_attention_2", or null for the default
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    chunk_tokens: int = 1024  # tokens per chunk of the chunked LM head / log-softmax (memory vs. speed)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # only used when name is "tiny"


@dataclass
class DataConfig:
    train: str | None = None  # training data: json/jsonl/parquet file(s) (comma-separated) or a hub dataset name
    format: Literal["auto", "messages", "prompt_completion", "preference", "prompt", "text"] = "auto"  # row format
    split: str = "train"  # split to read from a hub dataset or a multi-split file
    limit: int | None = None  # use at most this many rows (after reading, before shuffling)
    max_length: int = 1024  # longest tokenised sequence (prompt + completion); longer completions are cut
    max_prompt_length: int | None = None  # rows whose prompt is longer are skipped (and counted); null: max_length - 1
    chat_template: Literal["auto", "always", "never"] = "auto"  # auto: chat rows use the template, plain strings not
    shuffle: bool = True  # reshuffle the training rows every epoch (seeded)


@dataclass
class LossConfig:
    """``loss: dpo`` or ``loss: {name: dpo, beta: 0.1, ...}``; keys other than ``name`` are the loss's options."""

    name: str = "sft"  # a registered loss (see `align losses`) or "package.module:Class" for your own
    options: dict = field(default_factory=dict)  # the loss's own options, checked against its Options dataclass

    @classmethod
    def __from_dict__(cls, data: dict, where: str) -> dict:
        options = {k: v for k, v in data.items() if k not in ("name", "options")}
        options.update(data.get("options") or {})
        return {"name": data.get("name", "sft"), "options": options}

    def __to_dict__(self, out: dict) -> dict:
        return {"name": self.name, **self.options}

    def check(self, where: str) -> None:
        build_loss(self, where or "loss")  # unknown loss / option / bad value → ConfigError now, before any model


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; null: derived from `epochs` and the data size
    epochs: float = 1.0  # passes over the training data when `steps` is null
    batch_size: int = 32  # examples (sequences, pairs or prompts) per optimizer step
    micro_batch_size: int = 8  # examples per forward/backward; gradients accumulate up to batch_size
    micro_batch_tokens: int | None = None  # instead: a padded-token budget per micro-batch (length-grouped)
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; null disables
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # how many step checkpoints to keep (the final model is always kept)
    log_every: int = 1  # write metrics every N optimizer steps
    max_bad_steps: int = 5  # stop after this many consecutive steps with a NaN/Inf loss or gradient

    def check(self, where: str) -> None:
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ConfigError(f"{where}.micro_batch_tokens must be positive or null")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be positive, got {self.lr}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"{where}.steps must be at least 1 or null")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{where}.adam_betas must hold two numbers")


@dataclass
class EngineConfig:
    """The generation engine shared by evaluation and rollouts."""

    name: Literal["hf", "vllm"] = "hf"  # hf: transformers generate (any machine); vllm: in-process vLLM
    batch_size: int = 64  # hf: prompts per generate() call
    options: dict = field(default_factory=dict)  # extra keyword arguments for the engine (e.g. vllm.LLM kwargs)
    max_model_len: int | None = None  # vllm: longest prompt + completion; null: data.max_length + max_new_tokens
    sleep: bool = True  # vllm on GPU: free the KV cache during training, wake weights first before each push
    sleep_level: int = 1  # vllm: 1 offloads the weights to CPU while asleep; 2 discards them (needs sync_every 1)
    bucket_mb: float = 1024  # vllm: weight push bucket size in MiB (whole layers; bounds gathered ZeRO-3 memory)
    push_timeout_s: float | None = 600.0  # vllm: a weight-push bucket that takes longer raises instead of hanging

    def check(self, where: str) -> None:
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"{where}.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"{where}.bucket_mb must be positive, got {self.bucket_mb}")


@dataclass
class RewardSpec:
    """One reward term: ``{name: exact_match}`` or ``{name: my_pkg.rewards:score, weight: 0.5, ...}``."""

    name: str = "exact_match"  # a built-in reward (`align rewards`) or "package.module:function"
    weight: float = 1.0  # weight in the sum of reward terms
    options: dict = field(default_factory=dict)  # the reward's own keyword options

    @classmethod
    def __from_dict__(cls, data: dict, where: str) -> dict:
        options = {k: v for k, v in data.items() if k not in ("name", "weight", "options")}
        options.update(data.get("options") or {})
        out = {"name": data.get("name", "exact_match"), "options": options}
        if "weight" in data:
            out["weight"] = data["weight"]
        return out

    def __to_dict__(self, out: dict) -> dict:
        return {"name": self.name, "weight": self.weight, **self.options}


@dataclass
class RolloutConfig:
    """Online training: prompts → n samples each from the engine → rewards → the loss. Set it to train on rollouts
    (then `train.batch_size` counts prompts per optimizer step and `data.train` is not read)."""

    prompts: str = ""  # prompt file(s) or hub dataset: a `prompt` column plus the columns rewards read (`answer`)
    limit: int | None = None  # use at most this many prompts
    n: int = 4  # samples per prompt (one group)
    temperature: float = 1.0  # sampling temperature T; the trainer's log-probs are those of π_T = softmax(z/T)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64  # generation budget per sample
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # weighted sum of these terms
    reward_timeout_s: float | None = 300.0  # a reward call that takes longer is an error (or the default); null: none
    reward_on_error: Literal["raise", "default"] = "raise"  # a failing sample: stop with its details, or score default
    reward_default: float = 0.0  # the reward of a failing sample when reward_on_error is "default" (counted)
    sync_every: int = 1  # push the policy's weights to the engine every N optimizer updates
    tis_cap: float = 2.0  # C of the truncated importance weight min(π_trainer/π_engine, C) offered as `tis_weight`
    seeded: bool = True  # seed every rollout batch (reproducible; vLLM on GPU samples seeded requests a bit slower)
    shuffle: bool = True  # reshuffle the prompts every epoch (seeded)

    def check(self, where: str) -> None:
        if not self.prompts:
            raise ConfigError(f"{where}.prompts is required: a prompt(+answer) file or hub dataset")
        for name in ("n", "max_new_tokens", "sync_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"{where}: temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0 (0 = off)")
        if self.tis_cap <= 0:
            raise ConfigError(f"{where}.tis_cap must be positive, got {self.tis_cap}")
        if not self.rewards:
            raise ConfigError(f"{where}.rewards: give at least one reward, e.g. [{{name: exact_match}}]")


@dataclass
class EvalConfig:
    """Evaluation before/after training and every N steps: generation on held-out prompts (+answers), and
    preference accuracy on held-out pairs."""

    prompts: str | None = None  # held-out prompt(+answer) file; null disables evaluation
    limit: int | None = None  # evaluate on at most this many prompts
    n: int = 1  # samples per prompt (pass@k is reported for k = 1 and k = n)
    temperature: float = 0.0  # 0: greedy
    max_new_tokens: int = 32  # generation budget per sample
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # scored rewards; the first is "accuracy"
    every: int = 0  # evaluate every N optimizer steps (0: only before and after training)
    before: bool = True  # evaluate the initial model too
    pairs: str | None = None  # held-out preference pairs (prompt/chosen/rejected): preference accuracy of the policy vs. this stage's initial weights
    pairs_limit: int | None = None  # use at most this many held-out pairs


@dataclass
class ReferenceConfig:
    """Where the frozen reference policy's log-probs come from, for losses that need ``ref_logprobs`` (dpo, ...)."""

    precompute: bool = True  # dataset sources: one pass of the reference before training, cached on disk, model freed; false: keep a reference model in memory and run it every step
    cache_dir: str | None = None  # where precomputed log-probs are kept (file name = hash of weights, tokenised data, settings); null: RUN_DIR/ref_logprobs
    micro_batch_size: int | None = None  # examples per forward of the precompute pass (no gradients: can exceed train.micro_batch_size); null: train's

    def check(self, where: str) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"{where}.micro_batch_size must be at least 1 or null")


@dataclass
class BackendConfig:
    """Who owns the parameters and the optimizer step. README "Multi-process training with DeepSpeed ZeRO"."""

    name: Literal["torch", "deepspeed"] = "torch"  # torch: one process, CPU or one GPU; deepspeed: ZeRO data parallel over the processes torchrun / deepspeed started
    device: str = "auto"  # auto: cuda if available (deepspeed: cuda:LOCAL_RANK), else cpu
    zero_stage: Literal[0, 1, 2, 3] = 0  # deepspeed: 0 plain data parallel; 1 shards optimizer states; 2 + gradients; 3 + parameters
    offload_optimizer: bool = False  # deepspeed, stage >= 1: keep optimizer states (and the step) in CPU memory
    offload_params: bool = False  # deepspeed, stage 3: keep parameter shards in CPU memory between uses
    cpu_adam: bool = True  # with offload_optimizer: DeepSpeedCPUAdam (vectorised; compiled on first use, ~5 min once); false: torch AdamW (no build, slower step)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # deepspeed: fp32, or bf16 / fp16 mixed precision (16-bit weights and grads, fp32 master weights in the optimizer)
    deepspeed_config: str | None = None  # optional DeepSpeed JSON for knobs align does not set (buckets, overlap_comm, ...); align's config wins for the keys it sets, and a conflict is an error

    def check(self, where: str) -> None:
        if self.name == "torch":
            for key, default in (("zero_stage", 0), ("offload_optimizer", False), ("offload_params", False),
                                 ("precision", "fp32"), ("deepspeed_config", None)):
                if getattr(self, key) != default:
                    raise ConfigError(f"{where}.{key}={getattr(self, key)!r} needs {where}.name: deepspeed (the torch "
                                      "backend is one process without ZeRO; launch with torchrun or deepspeed, see "
                                      "README)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{where}.offload_params needs {where}.zero_stage: 3 (only ZeRO-3 shards parameters), "
                              f"got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{where}.offload_optimizer needs {where}.zero_stage 1, 2 or 3 (stage 0 keeps whole "
                              "optimizer states on every process)")


@dataclass
class PeftConfig:
    """LoRA adapters through peft (README "LoRA"): only the adapters train; the reference policy is the same model with
    its adapters disabled. ``peft: {}`` turns LoRA on with these defaults; no section (or null) trains every weight."""

    r: int = 16  # LoRA rank: each adapted weight W (out × in) learns ΔW = (alpha / r) · B A, B: out × r, A: r × in
    alpha: float = 32.0  # LoRA scale numerator (peft lora_alpha)
    dropout: float = 0.0  # dropout on the adapter's input (peft lora_dropout); the base model's dropout stays off
    target_modules: str | list[str] = "all-linear"  # "all-linear" (every linear layer but the LM head), module names matched as suffixes ([q_proj, v_proj]), or one regex string matched against full module names
    exclude_modules: list[str] = field(default_factory=list)  # module names (suffixes) to leave out of target_modules
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full and saved with the adapter (e.g. [lm_head]); tied embeddings stay tied
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r

    def check(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty: give module names, a regex, or \"all-linear\"")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            import re

            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"{where}.target_modules: {self.target_modules!r} is neither \"all-linear\" nor a "
                                  f"valid regex ({e}); for module names give a list, e.g. [q_proj, v_proj]") from None


@dataclass
class LogConfig:
    tensorboard: bool = True  # write TensorBoard events under RUN_DIR/tb
    progress: bool = True  # show a progress bar
    plots: bool = True  # write PNG curves under RUN_DIR/plots at the end
    entropy: bool = False  # log the policy's mean token entropy on trained tokens (one extra softmax per token)


@dataclass
class RunConfig:
    run_dir: str = "runs/run"  # where checkpoints, metrics and plots go
    seed: int = 0  # seeds data order, model init (tiny) and sampling
    resume: bool = True  # continue from RUN_DIR's latest checkpoint when there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig | None = None  # online training from rollouts; null: train on data.train
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    log: LogConfig = field(default_factory=LogConfig)
    peft: PeftConfig | None = None  # LoRA adapters (README "LoRA"); null: full fine-tuning

    @classmethod
    def __from_dict__(cls, data: dict, where: str) -> dict:
        if isinstance(data.get("loss"), str):
            data["loss"] = {"name": data["loss"]}
        if isinstance(data.get("model"), str):
            data["model"] = {"name": data["model"]}
        return data

    def check(self, where: str) -> None:
        loss_cls = build_loss(self.loss, "loss").__class__
        needs = loss_cls.needs
        check_output(self, loss_cls)
        if "rewards" in needs and self.rollout is None:
            raise ConfigError(
                f"loss '{self.loss.name}' needs rewards from rollouts: add a `rollout:` section (prompts, n, rewards), "
                "or use a dataset loss (see `align losses`)"
            )
        if self.rollout is not None:
            check_rollout(self)
            return
        if self.data.train is None:
            raise ConfigError("data.train is required: a json/jsonl/parquet file or a hub dataset name")
        from . import dsconfig

        dsconfig.check(self)  # backend / model / train consistency and the DeepSpeed JSON, before any model loads


@dataclass
class Stage:
    name: str
    config: RunConfig
    from_previous: bool = False  # starts from the previous stage's final/ (a later stage that sets no model.name)


@dataclass
class Pipeline:
    """A run: one stage, or several that each start from the previous stage's weights."""

    run_dir: str
    stages: list[Stage]
    raw: dict  # the merged mapping, written to RUN_DIR/config.yaml


def check_output(cfg: "RunConfig", loss_cls) -> None:
    """What the loss's ``output`` (losses.OUTPUTS) allows: a sequence-scoring model (a reward model) trains on data
    and is evaluated on held-out pairs; it has no per-token log-probs and cannot generate."""
    from losses import OUTPUTS

    name = cfg.loss.name
    if loss_cls.output not in OUTPUTS:
        raise ConfigError(f"loss '{name}' declares output {loss_cls.output!r}; a loss's output is one of "
                          f"{', '.join(OUTPUTS)}")
    if loss_cls.output != "scores":
        return
    policy_needs = sorted(loss_cls.needs & {"ref_logprobs", "old_logprobs", "ref_model", "rewards"})
    if policy_needs:
        raise ConfigError(f"loss '{name}' trains a sequence-scoring model (output 'scores') but needs "
                          f"{', '.join(policy_needs)}, which only a policy (output 'logprobs') has")
    if cfg.peft is not None:  # not written yet: LoRA wraps a causal LM (align/lora.py), not the score head
        raise ConfigError(f"loss '{name}' trains a reward model (output 'scores') with every weight; LoRA (`peft:`) "
                          "is for policies so far: drop the `peft:` section")
    if cfg.rollout is not None:
        raise ConfigError(f"loss '{name}' trains a reward model (output 'scores'), which cannot generate rollouts: "
                          "drop the `rollout:` section and give data.train")
    if cfg.eval.prompts:
        raise ConfigError(f"loss '{name}' trains a reward model (output 'scores'), which cannot generate: set "
                          "eval.prompts: null and evaluate it on held-out pairs with eval.pairs (pairwise accuracy)")


def check_rollout(cfg: "RunConfig") -> None:
    """What a rollout run needs beyond its own section."""
    if "pairs" in build_loss(cfg.loss, "loss").needs:
        raise ConfigError(f"loss '{cfg.loss.name}' trains on preference pairs; rollouts give groups of samples with "
                          "rewards (use a reward-driven loss, or drop the `rollout:` section)")
    if cfg.engine.name == "vllm" and cfg.engine.sleep and cfg.engine.sleep_level == 2 and cfg.rollout.sync_every != 1:
        raise ConfigError("engine.sleep_level 2 discards the engine's weights while training, so every rollout needs "
                          "a fresh push: set rollout.sync_every: 1, or engine.sleep_level: 1")


def build_loss(loss_cfg: LossConfig, where: str = "loss"):
    """Resolve the loss class and its options; configuration mistakes become ConfigError."""
    import losses
    from losses.base import OptionError, options_fields

    try:
        cls = losses.get_loss_class(loss_cfg.name)
    except ValueError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    valid = [f.name for f in options_fields(cls.Options)]
    for key in loss_cfg.options:
        if key not in valid:
            raise ConfigError(
                f"unknown option '{where}.{key}' for loss '{loss_cfg.name}'"
                + (suggest(key, valid) if valid else "; this loss takes no options")
            )
    try:
        opts = from_dict(cls.Options, loss_cfg.options, where)
        return cls(opts)
    except OptionError as e:
        raise ConfigError(f"{where} ({loss_cfg.name}): {e}") from None


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> Pipeline:
    """YAML file + ``a.b=c`` overrides → a checked :class:`Pipeline`. Every error is a ConfigError."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return pipeline_from_dict(data)


def pipeline_from_dict(data: dict) -> Pipeline:
    data = dict(data)
    stages_raw = data.pop("stages", None)
    run_dir = data.get("run_dir", RunConfig.run_dir)
    if not stages_raw:
        data = stage_refs.resolve(data, run_dir=run_dir, earlier=[], where="")  # no stages: no reference resolves
        return Pipeline(run_dir=run_dir, stages=[Stage("main", from_dict(RunConfig, data))], raw=data)
    if not isinstance(stages_raw, list):
        raise ConfigError("stages: expected a list of stage mappings, each with a `name`")
    stages, seen = [], set()
    for i, stage in enumerate(stages_raw):
        if not isinstance(stage, dict) or not stage.get("name"):
            raise ConfigError(f"stages[{i}]: every stage is a mapping with a `name`")
        stage = dict(stage)
        name = str(stage.pop("name"))
        if name in seen or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"stages[{i}].name {name!r} must be unique and use letters, digits, - and _")
        seen.add(name)
        for key in ("run_dir", "resume"):
            if key in stage:
                raise ConfigError(f"stages[{i}].{key}: set `{key}` once at the top level of a pipeline")
        merged = deep_merge(data, stage)
        if "loss" in stage:  # a stage's loss replaces the top-level one: its options belong to that loss alone
            merged["loss"] = stage["loss"]
        # a later stage starts from the previous stage's final/, unless it names its own model (a folder, tiny, or
        # an earlier stage's final/ as "@stage:NAME")
        own_model = "name" in (stage.get("model") or {})
        merged = stage_refs.resolve(merged, run_dir=run_dir, earlier=[s.name for s in stages], where=f"stages[{i}]")
        stages.append(Stage(name, from_dict(RunConfig, merged, f"stages[{i}]"), from_previous=i > 0 and not own_model))
    return Pipeline(run_dir=run_dir, stages=stages, raw={**data, "stages": stages_raw})


def stage_config_dict(cfg: RunConfig) -> dict:
    from .configio import to_dict

    return to_dict(cfg)


def replace(cfg: Any, **changes) -> Any:
    return dataclasses.replace(cfg, **changes)
