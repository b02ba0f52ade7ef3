"""The one training loop. It does not know which loss it runs.

    for each experience batch from the source:
        fill what the loss needs (ref / old log-probs), then loss.prepare (advantages, ...)
        for epoch in range(loss.epochs):
            for mini-batch in loss.minibatches parts:          # one optimizer step each
                for micro-batch (length-grouped):              # gradient accumulation
                    logprobs = policy forward (fp32, chunked head)
                    loss, metrics = loss_fn(logprobs, micro, ctx)   # ctx: optimizer-batch token counts
                    backward
                step (clip, skip if not finite)
        online sources: push the new weights to the engine
        checkpoint / evaluate on schedule (at experience-batch boundaries)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager

import numpy as np
import torch

import losses
from losses import Batch, LossContext
from rollouts.sources import DatasetSource

from . import checkpoint as ckpt
from . import distributed, lora, moving_reference
from .backend import build_backend
from .collate import collate, plan_micro_batches
from .config import RunConfig, build_loss
from .data import load_examples, load_prompts
from .head import decoder_hidden, ref_kl
from .metrics import MetricsLogger
from .models import count_parameters, load_model, load_tokenizer, materialize_model

log = logging.getLogger("align")


class TrainingError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs one stage: ``Trainer(cfg, run_dir).fit()``. ``init_path`` overrides ``cfg.model.name`` (pipelines)."""

    def __init__(self, cfg: RunConfig, run_dir: str | None = None, init_path: str | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or cfg.run_dir
        self.init_path = init_path
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.summary: dict = {}
        self._stop_requested = False
        self._set_up = False

    # ------------------------------------------------------------------------------------------------- set-up
    def setup(self) -> "Trainer":
        if self._set_up:
            return self
        cfg = self.cfg
        # processes: one (torch) or the group torchrun / deepspeed started; rank 0 writes logs, metrics, files
        self.dist = distributed.setup(cfg)
        self.is_main = self.dist.is_main
        os.makedirs(self.run_dir, exist_ok=True)
        if self.is_main:
            _log_to_file(self.run_dir)
        seed_everything(cfg.seed)
        self.device = self.dist.device
        self.loss = build_loss(cfg.loss)
        needs = self.loss.needs

        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if cfg.resume else None
        if self.init_path is None and self.is_main:
            materialize_model(cfg.model, self.run_dir, cfg.seed)
        self.dist.barrier()
        base = self.init_path or materialize_model(cfg.model, self.run_dir, cfg.seed)
        self.base_path = base
        self.dist.configure(cfg, base)  # DeepSpeed: its config, before any model loads (ZeRO-3 loads into shards)
        tok_path = cfg.model.tokenizer or base
        self.tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)

        if cfg.rollout is None:
            examples, stats, fmt = load_examples(cfg.data.train, self.tokenizer, cfg.data,
                                                 progress=cfg.log.progress and self.is_main)
            if "pairs" in needs and fmt != "preference":
                raise TrainingError(f"loss '{self.loss.name}' trains on preference pairs but {cfg.data.train} is "
                                    f"'{fmt}' data; give prompt/chosen/rejected rows")
            if "pairs" not in needs and fmt == "preference":
                raise TrainingError(f"loss '{self.loss.name}' does not use preference pairs; {cfg.data.train} has "
                                    "chosen/rejected rows (use a preference loss such as dpo)")
            self.data_stats = stats
            log.info("data: %s", stats.summary())
        else:  # online: prompts now, examples from rollouts (align/online.py)
            examples = load_prompts(cfg.rollout.prompts, self.tokenizer, cfg.data, cfg.rollout.limit)
            self.data_stats = None
            log.info("rollout prompts: %d from %s", len(examples), cfg.rollout.prompts)
        self.eval_prompts = None
        if cfg.eval.prompts:
            self.eval_prompts = load_prompts(cfg.eval.prompts, self.tokenizer, cfg.data, cfg.eval.limit)

        self.experience_size = cfg.train.batch_size * self.loss.minibatches
        # a rollout run trains the policy it samples, π_T = softmax(z / T): its log-probs (policy, old, reference,
        # entropy) are taken at the sampling temperature, as TRL, verl and OpenRLHF do (greedy: T = 1)
        self.temperature = cfg.rollout.temperature if cfg.rollout is not None and cfg.rollout.temperature > 0 else 1.0
        if cfg.rollout is None:
            self.source = DatasetSource(examples, self.experience_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                        rank=self.dist.rank, world_size=self.dist.world_size)
        self.total_steps = self._total_steps(len(examples))

        weights = os.path.join(self.resume_from, "model") if self.resume_from else base
        finished = _read_summary(self.run_dir) if cfg.resume else {}
        self.finished = bool(finished.get("final_model")) and finished.get("steps") == self.total_steps \
            and os.path.isfile(os.path.join(finished["final_model"], ckpt.COMPLETE))
        if self.finished:  # a finished run: its final weights, nothing left to train
            weights, self.resume_from = finished["final_model"], None
            self.summary, self.step = finished, self.total_steps
        if self.loss.output == "scores":  # a reward model: a sequence-classification head (no LoRA: config check)
            self.model = load_model(weights, cfg.model, self.device, output="scores",
                                    pad_token_id=self.tokenizer.pad_token_id)
        else:
            self.model = lora.load_policy(weights, base, cfg, self.device)  # LoRA (peft:): base + adapters
        total, trainable = count_parameters(self.model)
        log.info("model %s: %.2fM parameters (%.2fM trainable) on %s", base, total / 1e6, trainable / 1e6,
                 self.device)
        self.backend = build_backend(self.model, cfg, self.total_steps, self.dist, output=self.loss.output)
        if self.dist.zero3 and (self.loss.reference_ema or "reference_rewards" in needs):
            raise TrainingError(f"loss '{self.loss.name}' samples from or moves its reference model, which is not "
                                "supported under ZeRO-3 (sharded parameters); use zero_stage 0-2 or one process")
        self.ref_model = None
        self._precompute_model = None
        self.ref_cache = None  # reference log-probs precomputed over the training data (align/reference.py)
        if "ref_logprobs" in needs and cfg.reference.precompute and cfg.rollout is None:  # a dataset source
            self.ref_cache = self._precomputed_reference(examples, "train")
        self.eval_pairs = self._load_eval_pairs()
        self._precompute_model = None  # a reference loaded only for the precompute pass is freed here
        if "ref_model" in needs or "reference_rewards" in needs or ("ref_logprobs" in needs and self.ref_cache is None):
            # the frozen initial policy; from the base weights when resuming or finished (and under ZeRO-3, whose
            # policy is already sharded: the reference loads into its own shards)
            fresh = self.resume_from or self.step or self.dist.zero3
            self.ref_model = lora.reference_view(self.model)  # LoRA: the policy with its adapters off, no copy
            if self.ref_model is None:
                self.ref_model = load_model(base, cfg.model, self.device) if fresh else copy.deepcopy(self.model)
                self.ref_model.eval().requires_grad_(False)
                self.ref_model = self.backend.prepare_reference(self.ref_model)

        self.engine = self.engine_sync = None
        self.evaluates = self.eval_prompts is not None or self.eval_pairs is not None
        if self.eval_prompts is not None or cfg.rollout is not None:
            from .online import EngineSync, build_engine, build_rollout_source, checkpoint_step

            start, push = lora.engine_start(weights, base) if cfg.peft is not None else (weights, False)
            self.engine = build_engine(cfg, self.model, self.tokenizer, start, checkpoint_step(self.resume_from))
            self.engine_sync = EngineSync(self.engine, self.backend.named_weights,
                                          sync_every=cfg.rollout.sync_every if cfg.rollout else 1,
                                          sleep=cfg.engine.name == "vllm" and cfg.engine.sleep)
            if push and self.engine.copies_weights:  # LoRA: the engine started from the base; give it the policy
                self.engine_sync.push(self.engine.weight_version)
            if cfg.rollout is not None:
                self.source = build_rollout_source(cfg, examples, self.engine, self.run_dir, self.experience_size,
                                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                                   loss=self.loss, reference_model=self.ref_model,
                                                   tokenizer=self.tokenizer)
        from .evaluate import build_rewards

        self.eval_rewards = build_rewards(cfg.eval.rewards) if self.eval_prompts is not None else []
        if self.resume_from:
            self._restore(self.resume_from)
        self._set_up = True
        return self

    def _total_steps(self, n_examples: int) -> int:
        t = self.cfg.train
        if t.steps is not None:
            return t.steps
        # one pass over the data: its experience batches, each giving loss.epochs × loss.minibatches steps
        experiences = math.ceil(n_examples / self.experience_size)
        steps_per_epoch = experiences * self.loss.epochs * self.loss.minibatches
        return max(1, math.ceil(steps_per_epoch * t.epochs))

    # ------------------------------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "source": self.source.state_dict(),
            "rng": ckpt.rng_state(),
            "summary": self.summary,
            "total_steps": self.total_steps,
        }

    def _restore(self, path: str) -> None:
        state, opt = ckpt.load_checkpoint(path)
        if state.get("total_steps") != self.total_steps:
            raise TrainingError(f"{path} was written by a run of {state.get('total_steps')} steps, this config has "
                                f"{self.total_steps}; resume with the same config or start a new run_dir")
        self.backend.load_state_dict(opt, path)
        if self.loss.reference_ema:
            moving_reference.load(self.ref_model, path)
        self.source.load_state_dict(state["source"])
        self.step = state["step"]
        self.bad_steps = state.get("bad_steps", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.summary = state.get("summary", {})
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str:
        def save_model(folder):
            self.backend.save_model(folder, self.tokenizer)

        def save_state(folder):
            self.backend.save_state(folder)
            if self.loss.reference_ema and self.is_main:  # a moving reference is training state (align/moving_reference.py)
                moving_reference.save(self.ref_model, folder)

        path = ckpt.save_checkpoint(self.run_dir, self.step, save_model, self.backend.state_dict(),
                                    self._trainer_state(), keep=self.cfg.train.keep_checkpoints,
                                    save_state=save_state, comm=self.backend)
        log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------------------------------- forward pieces
    def _forward(self, model, mb: Batch, with_entropy: bool = False, temperature: float | None = None):
        """(hidden, log-probs, entropy) of ``model``; the backend runs it (through DeepSpeed's engine for its models)."""
        return self.backend.forward(model, mb.input_ids, mb.attention_mask, mb.loss_mask,
                                    chunk_tokens=self.cfg.model.chunk_tokens, with_entropy=with_entropy,
                                    temperature=temperature or self.temperature)

    def _no_grad_plan(self, batch: Batch, units: list[list[int]], micro_batch_size: int | None = None):
        """Micro-batches (row lists) of a no-grad pass over ``batch``, padded to the same count on every rank (ZeRO-3
        gathers per module); padded micro-batches repeat rows, so writing their outputs again changes nothing."""
        t = self.cfg.train
        plan = plan_micro_batches(batch, units, micro_batch_size or t.micro_batch_size, t.micro_batch_tokens)
        return distributed.pad_plan(plan, self.backend, _filler(batch, plan))[0]

    @torch.no_grad()
    def _logprobs_no_grad(self, model, batch: Batch, units: list[list[int]],
                          micro_batch_size: int | None = None, temperature: float | None = None) -> torch.Tensor:
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        for rows in self._no_grad_plan(batch, units, micro_batch_size):
            mb = batch.select(rows)
            _, lp, _ = self._forward(model, mb, temperature=temperature)
            out[torch.as_tensor(rows, device=out.device), : mb.seq_len] = lp
        return out

    @torch.no_grad()
    def _scores_no_grad(self, model, batch: Batch, units: list[list[int]]) -> torch.Tensor:
        """(B,) scores of a sequence-scoring model (loss output "scores"), with the same forwards on every rank."""
        out = torch.zeros(len(batch), dtype=torch.float32, device=batch.input_ids.device)
        for rows in self._no_grad_plan(batch, units):
            _, scores, _ = self._forward(model, batch.select(rows))
            out[torch.as_tensor(rows, device=out.device)] = scores
        return out

    def _fill_needs(self, batch: Batch, units: list[list[int]]) -> dict[str, float]:
        """Fill what the loss needs; for rollouts also the engine-vs-trainer mismatch and ``tis_weight``."""
        needs = self.loss.needs
        if "rewards" in needs and "reward" not in batch.extras:
            raise TrainingError(f"loss '{self.loss.name}' needs rewards (batch.extras['reward']), but this batch has "
                                "none (they come from rollouts: add a `rollout:` section)")
        if "ref_logprobs" in needs and "ref_logprobs" not in batch.extras:
            batch.extras["ref_logprobs"] = self.ref_cache.fill(batch, units) if self.ref_cache is not None \
                else self._logprobs_no_grad(self.ref_model, batch, units)
        online = "engine_logprobs" in batch.extras
        if ("old_logprobs" not in needs and not online) or self._old_from_update():
            return {}  # nothing to fill, or filled per micro-batch from the update's own forward (_optimizer_step)
        policy = self._logprobs_no_grad(self.model, batch, units)  # the policy before this batch's updates
        if "old_logprobs" in needs:
            batch.extras["old_logprobs"] = policy
        if not online:
            return {}
        if self.temperature != 1.0:  # engines report temperature-1 log-probs: compare like with like
            policy = self._logprobs_no_grad(self.model, batch, units, temperature=1.0)
        metrics, batch.extras["tis_weight"] = self._engine_mismatch(policy, batch)
        return metrics

    def _engine_mismatch(self, policy: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None):
        """(mismatch metrics, (B, T) tis_weight) of the trainer's log-probs ``policy`` against the engine's, over the
        policy's own samples of ``batch`` (its ``rows`` when given): rows another engine sampled (a reference or
        anchor, ``reference_sample`` = 1) are left out, and ``mismatch/weight_lag`` counts the updates the sampling
        weights had not received (sync_every > 1)."""
        from .offpolicy import engine_mismatch

        ex = batch.extras

        def pick(t):
            return t if rows is None else t[rows]

        mask, own = pick(batch.loss_mask), None
        if "reference_sample" in ex:
            own = pick(ex["reference_sample"]) < 0.5  # (B,)
            mask = mask & own[:, None]
        metrics, tis = engine_mismatch(pick(policy), pick(ex["engine_logprobs"]), mask, self.cfg.rollout.tis_cap)
        if "weight_version" in ex:
            versions = pick(ex["weight_version"])
            metrics["mismatch/weight_lag"] = self.step - float((versions if own is None else versions[own]).mean())
        return metrics, tis

    def _old_from_update(self) -> bool:
        """One optimizer step per experience batch and a ``prepare`` that does not read π_old: the step's own forward
        runs with the weights that made the batch, so its detached log-probs are π_old (TRL's num_iterations=1
        shortcut) and the separate no-grad policy pass is skipped. Not when sampling at a temperature ≠ 1: the engine
        mismatch then compares temperature-1 log-probs, which the update's forward (at the temperature) does not give."""
        prepare_reads = getattr(self.loss, "prepare_needs", self.loss.needs)  # duck-typed losses: all needs
        return (self.loss.epochs * self.loss.minibatches == 1 and "old_logprobs" not in prepare_reads
                and self.temperature == 1.0)

    def _fill_from_update(self, mb: Batch, lp: torch.Tensor) -> None:
        """old_logprobs and tis_weight of micro-batch ``mb`` from its own (detached) forward log-probs ``lp``."""
        if "old_logprobs" in self.loss.needs:
            mb.extras["old_logprobs"] = lp
        if "engine_logprobs" in mb.extras:
            _, mb.extras["tis_weight"] = self._engine_mismatch(lp, mb)

    # ---------------------------------------------------------------------------------- precomputed reference
    def _precomputed_reference(self, examples, name: str):
        """Reference log-probs of ``examples``: from the disk cache, or one pass of the reference (this stage's initial
        weights) now (LOSSES.md §2.4)."""
        from . import reference

        cfg = self.cfg
        settings = {"dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation, "max_length": cfg.data.max_length}
        return reference.cached(
            examples, weights=reference.weights_fingerprint(self.base_path), get_model=self._reference_for_precompute,
            logprobs_fn=self._reference_pass, settings=settings, pad_id=self.tokenizer.pad_token_id,
            cache_dir=cfg.reference.cache_dir or os.path.join(self.run_dir, "ref_logprobs"), device=self.device,
            progress=cfg.log.progress, name=name, is_main=self.is_main,
            all_agree=lambda hit: self.backend.all_reduce_sum([float(hit)])[0] == self.dist.world_size)

    def _reference_for_precompute(self):
        view = lora.reference_view(self.model)  # LoRA: the base is the policy with its adapters off
        if view is not None:
            return view
        if self.step == 0 and not self.resume_from:
            return self.model  # before the first step the policy is the reference
        if self._precompute_model is None:
            self._precompute_model = load_model(self.base_path, self.cfg.model, self.device)
        return self._precompute_model

    def _reference_pass(self, model, batch: Batch, units: list[list[int]]) -> torch.Tensor:
        return self._logprobs_no_grad(model, batch, units, self.cfg.reference.micro_batch_size)

    def _load_eval_pairs(self):
        if not self.cfg.eval.pairs:
            return None
        from .pref_eval import load_pairs

        examples = load_pairs(self.cfg.eval.pairs, self.tokenizer, self.cfg.data, self.cfg.eval.pairs_limit)
        if self.loss.output == "scores":  # a reward model ranks pairs by its own scores: no reference
            return examples, None
        return examples, self._precomputed_reference(examples, "eval")

    def _context(self, batch: Batch, rows: list[int], n_micro: int) -> LossContext:
        sel = torch.as_tensor(rows, dtype=torch.long, device=batch.loss_mask.device)
        tokens, seqs, micro = self.backend.all_reduce_sum(
            [float(batch.loss_mask[sel].sum()), float(len(rows)), float(n_micro)])
        return LossContext(num_tokens=tokens, num_sequences=seqs, num_micro_batches=int(micro),
                           max_length=self.cfg.data.max_length, step=self.step, aggregation=self.loss.aggregation)

    # ------------------------------------------------------------------------------------------------ one step
    def _optimizer_step(self, batch: Batch, units: list[list[int]]) -> dict:
        t = self.cfg.train
        rows_all = [r for u in units for r in u]
        plan = plan_micro_batches(batch, units, t.micro_batch_size, t.micro_batch_tokens)
        ctx = self._context(batch, rows_all, len(plan))
        plan, n_real = distributed.pad_plan(plan, self.backend, _filler(batch, plan))  # same count on every rank
        model = self.backend.module
        model.train()
        total_loss, finite = 0.0, True
        sums: dict[str, float] = {}
        weight = 0
        tokens = 0
        online = "engine_logprobs" in batch.extras
        from_update = ("old_logprobs" in self.loss.needs or online) and self._old_from_update()
        policy = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device) if from_update and online else None
        for i, rows in enumerate(plan):
            real = i < n_real  # padded micro-batches run with weight 0 (distributed.pad_plan)
            mb = batch.select(rows)
            hidden, lp, ent = self._forward(model, mb, with_entropy=self.cfg.log.entropy)
            if from_update:
                self._fill_from_update(mb, lp.detach())
                if policy is not None and real:
                    policy[torch.as_tensor(rows, device=policy.device), : mb.seq_len] = lp.detach()
            if "ref_model" in self.loss.needs:
                with torch.no_grad():
                    ref_hidden = decoder_hidden(self.ref_model, mb.input_ids, mb.attention_mask)
                n_chunks = self.backend.agreed_chunks(mb.loss_mask, self.cfg.model.chunk_tokens)
                ctx.ref_kl_fn = lambda h=hidden, rh=ref_hidden, m=mb, c=n_chunks: ref_kl(
                    model, h, self.ref_model, rh, m.loss_mask, chunk_tokens=self.cfg.model.chunk_tokens, n_chunks=c)
            loss, metrics = self.loss(lp, mb, ctx)
            if not real:
                loss = loss * 0.0
            if ent is not None:
                metrics["entropy"] = float((ent * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1))
            value = float(loss.detach())
            # a non-finite loss does not stop the loop: every rank must make the same backward calls; the step is
            # skipped below, on every rank, when any rank saw one
            finite = finite and math.isfinite(value)
            self.backend.backward(loss)
            total_loss += value
            n = len(rows) if real else 0
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            weight += n
            tokens += int(mb.attention_mask.sum()) if real else 0
        finite = self.backend.all_reduce_sum([0.0 if finite else 1.0])[0] == 0
        lr = self.backend.lr  # the rate this step applies (the schedule advances in step())
        if finite:
            grad_norm, applied = self.backend.step()
            if applied and self.loss.reference_ema:  # a moving reference (J-BOND's anchor) follows the policy
                moving_reference.ema_update(self.ref_model, model, self.loss.reference_ema)
        else:
            self.backend.skip_step()
            grad_norm, applied = float("nan"), False
        sums, (weight, tokens, total_loss) = distributed.reduce_metrics(sums, [weight, tokens, total_loss],
                                                                         self.backend)
        out = {k: v / max(weight, 1) for k, v in sums.items()}
        out.update(loss=total_loss if finite else float("nan"),
                   grad_norm=grad_norm, lr=lr, tokens=float(tokens),
                   loss_tokens=float(ctx.num_tokens), sequences=float(ctx.num_sequences))
        out["skipped"] = 0.0 if applied else 1.0
        if policy is not None:  # the engine-vs-trainer mismatch over this step's rows (as _fill_needs logs it)
            out.update(self._engine_mismatch(policy, batch, torch.as_tensor(rows_all, dtype=torch.long,
                                                                            device=policy.device))[0])
        return out

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> dict:
        """Train to ``train.steps``, or stop after ``max_steps`` more optimizer steps, rounded up to the end of the
        experience batch in progress (losses with ``minibatches`` > 1 take several steps per batch)."""
        self.setup()
        cfg = self.cfg
        if self.finished:
            log.info("%s already finished (%d steps); nothing to do", self.run_dir, self.total_steps)
            return self.summary
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                               total_steps=self.total_steps, start_step=self.step, enabled=self.is_main,
                               keep_before_eval="before" in self.summary)
        self.logger = logger
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        if self.step == 0 and cfg.eval.before and self.evaluates and "before" not in self.summary:
            self.summary["before"] = self._evaluate(logger, tag="before")
        next_save = self._next_multiple(cfg.train.save_every)
        next_eval = self._next_multiple(cfg.eval.every)
        last_log = time.time()
        with _graceful_stop(self):
            while self.step < stop_at and not self._stop_agreed():
                examples = self.source.next_batch()
                # a short last batch can leave a rank without examples: it collates a placeholder and runs only
                # weight-0 micro-batches, so the ranks stay in step
                batch, units = collate(examples or self.source.examples[:1], self.tokenizer.pad_token_id)
                if not examples:
                    units = []
                batch = batch.to(self.device)
                t0 = time.time()
                batch_metrics = {**getattr(self.source, "last_metrics", {}), **self._fill_needs(batch, units)}
                gctx = self._context(batch, [r for u in units for r in u], 1)
                with torch.no_grad():
                    batch = self.loss.prepare(batch, gctx)
                batch_metrics["prepare_time"] = time.time() - t0  # reference / old log-probs and loss.prepare
                if self.source.online:
                    self.engine_sync.before_updates()
                for epoch in range(self.loss.epochs):
                    order = list(range(len(units)))
                    if self.loss.epochs > 1 or self.loss.minibatches > 1:
                        random.Random(f"{cfg.seed}-{self.step}-{epoch}").shuffle(order)
                    parts = np.array_split(np.array(order), self.loss.minibatches)
                    for part in parts:
                        # an experience batch is finished before stopping early (max_steps, signals): checkpoints
                        # sit at experience boundaries, so a resume never skips the rest of a batch
                        if self.step >= self.total_steps or self.backend.all_reduce_sum([float(len(part))])[0] == 0:
                            break
                        t_update = time.time()
                        metrics = {**batch_metrics, **self._optimizer_step(batch, [units[i] for i in part])}
                        self.step += 1
                        now = time.time()
                        metrics["update_time"] = now - t_update  # forward, backward and optimizer step
                        metrics["step_time"] = now - t0
                        metrics["tokens_per_s"] = metrics["tokens"] / max(now - t0, 1e-9)
                        t0 = now
                        self._after_step(metrics, logger)
                if self.source.online:
                    self._sync_engine(logger)
                if self.step >= next_save and self.step < self.total_steps:
                    self.save()
                    next_save = self._next_multiple(cfg.train.save_every)
                if self.step >= next_eval and self.step < self.total_steps and self.evaluates:
                    self._evaluate(logger, tag=f"step-{self.step}")
                    next_eval = self._next_multiple(cfg.eval.every)
        if self._stop_agreed() or self.step < self.total_steps:
            self.save()
            logger.close()
            return self.summary
        self._finish(logger)
        return self.summary

    def _sync_engine(self, logger: MetricsLogger) -> None:
        """After an experience batch's updates: push the new weights to the rollout engine (align/online.py)."""
        from rollouts.engine_state import EngineError

        try:
            metrics = self.engine_sync.after_updates(self.step)
        except EngineError as e:
            path = self.save()
            logger.close()
            raise TrainingError(f"step {self.step}: {e}. The trained weights are saved in {path}; run the same "
                                "command again to resume from there") from e
        if metrics:
            logger.log(self.step, metrics, kind="engine")

    def _stop_agreed(self) -> bool:
        """A stop signal seen by any rank stops every rank at the same step."""
        if self.backend.world_size == 1:
            return self._stop_requested
        return self.backend.all_reduce_sum([float(self._stop_requested)])[0] > 0

    def _next_multiple(self, every: int) -> int:
        if not every:
            return 1 << 62
        return (self.step // every + 1) * every

    def _after_step(self, metrics: dict, logger: MetricsLogger) -> None:
        if metrics["skipped"]:
            self.bad_steps += 1
            self.skipped_steps += 1
            logger.write(f"step {self.step}: non-finite loss or gradient (loss={metrics['loss']}, "
                         f"grad_norm={metrics['grad_norm']}); update skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                path = self.save()
                logger.log(self.step, {**metrics, "skipped_total": self.skipped_steps})
                logger.close()
                raise TrainingError(
                    f"{self.bad_steps} optimizer steps in a row had a NaN/Inf loss or gradient; stopped at step "
                    f"{self.step}. The last good weights are saved in {path}. Lower the learning rate, check the "
                    "data, or use float32.")
        else:
            self.bad_steps = 0
        metrics["skipped_total"] = float(self.skipped_steps)
        if self.step % max(self.cfg.train.log_every, 1) == 0 or self.step == self.total_steps:
            logger.log(self.step, metrics)
        logger.progress(1, loss=metrics["loss"], tok_s=metrics["tokens_per_s"])

    def _evaluate(self, logger: MetricsLogger, tag: str) -> dict:
        if self.engine_sync is not None:  # generation eval: the engine must hold the current weights
            self.engine_sync.ensure_current(self.step)
        t0 = time.time()
        metrics = evaluate_model(self, tag)
        metrics["eval_time"] = time.time() - t0
        logger.log(self.step, metrics, kind="eval")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if k in ("accuracy", "pass@1", "mean_length", "pref_accuracy", "pref_logp_accuracy"))
        logger.write(f"eval [{tag}] step {self.step}: {shown}")
        return metrics

    def _finish(self, logger: MetricsLogger) -> None:
        cfg = self.cfg
        if self.evaluates:
            self.summary["after"] = self._evaluate(logger, tag="after")
        final = ckpt.save_final(self.run_dir, lambda folder: self.backend.save_model(folder, self.tokenizer),
                                comm=self.backend)
        self.summary["final_model"] = final
        self.summary["steps"] = self.step
        self.summary["data"] = self.data_stats.summary() if self.data_stats else f"{len(self.source)} prompts"
        logger.close()
        if not self.is_main:
            return
        if cfg.log.plots:
            from .plot import plot_run

            self.summary["plots"] = plot_run(self.run_dir)
        import json

        ckpt.atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(self.summary, indent=2))


def _filler(batch: Batch, plan: list[list[int]]) -> list[int] | None:
    """Rows for a rank's weight-0 micro-batches when it has no real one: the batch's first example whole (its
    samples are adjacent and share a group id), so a preference pair stays a pair. None: pad_plan's default."""
    if plan or batch.group_ids is None:
        return None
    g = batch.group_ids.tolist()
    k = 1
    while k < len(g) and g[k] == g[0]:
        k += 1
    return list(range(k))


def _read_summary(run_dir: str) -> dict:
    import json

    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def evaluate_model(trainer: Trainer, tag: str) -> dict:
    from .evaluate import evaluate

    metrics = {}
    if trainer.eval_prompts is not None:
        # every rank evaluates (under ZeRO-3 generation gathers parameters collectively); rank 0 writes the samples
        path = os.path.join(trainer.run_dir, "samples", f"eval-{tag}.jsonl") if trainer.is_main else None
        metrics.update(evaluate(trainer.engine, trainer.eval_prompts, trainer.cfg.eval, trainer.eval_rewards,
                                seed=trainer.cfg.seed, samples_path=path))
    if trainer.eval_pairs is not None:  # every rank runs the same forwards (collective under ZeRO-3)
        from .pref_eval import preference_metrics

        examples, ref = trainer.eval_pairs
        if ref is None:  # a reward model: pairwise accuracy of its scores (align/reward_eval.py)
            from .reward_eval import reward_pair_metrics

            metrics.update(reward_pair_metrics(trainer.model, examples, trainer._scores_no_grad,
                                               trainer.tokenizer.pad_token_id, trainer.device))
        else:
            metrics.update(preference_metrics(trainer.model, examples, ref, trainer._reference_pass,
                                              trainer.tokenizer.pad_token_id, trainer.device))
    return metrics


@contextmanager
def _graceful_stop(trainer: Trainer):
    """SIGTERM / SIGINT: finish the current step, write a checkpoint, return (a second Ctrl-C aborts)."""
    previous = {}

    def handler(signum, frame):
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer._stop_requested = True
        log.warning("signal %d: stopping after this step and saving a checkpoint (again to abort)", signum)

    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _log_to_file(run_dir: str) -> None:
    path = os.path.abspath(os.path.join(run_dir, "train.log"))
    root = logging.getLogger("align")
    root.setLevel(logging.INFO)
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename != path
              and os.path.basename(h.baseFilename) == "train.log"]:  # an earlier run's log (same process): detach it
        root.removeHandler(h)
        h.close()
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
