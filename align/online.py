"""Online training pieces the trainer composes: the engine, the rollout source, and weight sync.

The trainer's loop stays the same for online runs; it only

- builds a :class:`rollouts.rollout_source.RolloutSource` instead of a ``DatasetSource`` (``rollout:`` section),
- calls :meth:`EngineSync.before_updates` / :meth:`EngineSync.after_updates` around each experience batch's
  optimizer steps: the engine sleeps during training (GPU vLLM), wakes its weights, receives the new policy every
  ``rollout.sync_every`` updates (stamped with the trainer's step), then wakes its KV cache.
"""

from __future__ import annotations

import json
import logging
import os
import time

from rollouts.engine import SamplingParams

log = logging.getLogger("align")


def checkpoint_step(path: str | None) -> int:
    """The optimizer step a checkpoint folder was written at (0 without one)."""
    if not path:
        return 0
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f).get("step", 0))


def build_engine(cfg, model, tokenizer, weights_path: str, step: int = 0):
    """``engine.name`` hf: transformers ``generate`` on the training model itself; vllm: an in-process vLLM engine
    started from ``weights_path`` (the initial or resumed weights), version-stamped ``step``."""
    e = cfg.engine
    if e.name == "hf":
        from rollouts.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer, batch_size=e.batch_size)
        engine.weight_version = step
        return engine
    from rollouts.vllm_engine import VLLMEngine

    max_new = max(cfg.eval.max_new_tokens, cfg.rollout.max_new_tokens if cfg.rollout else 0)
    max_len = e.max_model_len
    if max_len is None:
        limit = getattr(model.config, "max_position_embeddings", None) or (1 << 30)
        max_len = min(limit, cfg.data.max_length + max_new)
    return VLLMEngine(weights_path, tokenizer, dtype=cfg.model.dtype, seed=cfg.seed, max_model_len=max_len,
                      sleep_level=e.sleep_level, bucket_mb=e.bucket_mb, push_timeout_s=e.push_timeout_s,
                      llm_kwargs=dict(e.options), weight_version=step)


def build_rollout_source(cfg, prompts, engine, run_dir: str, batch_size: int, rank: int = 0, world_size: int = 1,
                         loss=None, reference_model=None, tokenizer=None):
    """The RolloutSource, followed (rollouts/processed_source.py) by the steps the loss and ``rollout.select`` ask
    for: reference-rank counts from samples of ``reference_model`` (a loss needing ``reference_rewards``), then the
    selection (``rollout.select``)."""
    from rollouts.rollout_source import RolloutSource

    r = cfg.rollout
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, seed=cfg.seed if r.seeded else None)
    source = RolloutSource(prompts, engine, _scorer(r), sampling, n=r.n, batch_size=batch_size, seed=cfg.seed,
                           seeded=r.seeded, shuffle=r.shuffle,
                           samples_path=os.path.join(run_dir, "samples", "rollouts.jsonl"), rank=rank,
                           world_size=world_size)
    steps = []
    needs = loss.needs if loss is not None else frozenset()
    if "reference_rewards" in needs:
        from rollouts.reference_rewards import ReferenceRewards

        from .lora import reference_engine

        if reference_model is None or tokenizer is None:
            raise ValueError(f"loss '{loss.name}' needs reference rewards: pass the reference model and tokenizer")
        # transformers generate on the frozen (or EMA-moving) reference model the trainer holds, or on the LoRA
        # policy with its adapters off: no second copy
        ref_engine = reference_engine(reference_model, tokenizer, cfg.engine.batch_size)
        steps.append(ReferenceRewards(ref_engine, _scorer(r), sampling, loss.reference_samples,
                                      cache=not loss.reference_ema, add_best="reference_best" in needs,
                                      seed=cfg.seed, rank=rank))
    if r.select != "all":
        from rollouts.selection import build_selector

        steps.append(build_selector(r.select, r.select_threshold))
    if not steps:
        return source
    from rollouts.processed_source import ProcessedSource

    return ProcessedSource(source, steps)


def _scorer(r):
    from rollouts.scoring import Scorer

    from .evaluate import build_rewards

    return Scorer(build_rewards(r.rewards), timeout_s=r.reward_timeout_s, on_error=r.reward_on_error,
                  default=r.reward_default)


class EngineSync:
    """Keeps a generation engine in step with the policy being trained.

    The engine's ``weight_version`` is the optimizer step of the weights it holds (the trainer stamps every push with
    its step), so ``step − weight_version`` is how many updates the engine has not received.
    """

    def __init__(self, engine, weights_fn, sync_every: int = 1, sleep: bool = False):
        self.engine = engine
        self.weights_fn = weights_fn  # () -> iterable of (name, full tensor): the policy's current weights
        self.sync_every = sync_every
        self.sleep = sleep

    def before_updates(self) -> None:
        if self.sleep:
            self.engine.sleep()

    def after_updates(self, step: int) -> dict[str, float]:
        """Wake the weights, push if due (a shared-weights engine is only stamped), wake the KV cache."""
        self.engine.wake_weights()
        metrics = {}
        if not self.engine.copies_weights or step - self.engine.weight_version >= self.sync_every:
            metrics = self.push(step)
        self.engine.wake()
        return metrics

    def ensure_current(self, step: int) -> None:
        """Before evaluation with the engine: push the updates it has not received."""
        if self.engine.weight_version != step:
            self.engine.wake_weights()
            self.push(step)
            self.engine.wake()

    def push(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.engine.load_weights(self.weights_fn(), version=step)
        if not self.engine.copies_weights:
            return {}
        return {"engine/push_seconds": time.perf_counter() - t0, "engine/weight_version": float(step)}
