"""Generation with an in-process vLLM engine colocated with training, updated in place after optimizer steps.

Targets vLLM 0.32 (see ``rollouts/vllm_adapter.py``, the only module that calls vLLM). The engine is created once
from a Hugging Face folder; after training steps the trainer pushes the new weights with :meth:`load_weights`:
a lazy stream of ``(name, full tensor)`` cut into layer-aligned, size-bounded buckets (``rollouts/weights.py``),
each bucket one ``reload_weights`` call with a deadline, then the prefix cache is dropped and the push's weight
version is stamped into vLLM so every completion records the version it was sampled with.

Log-probs are vLLM's ``raw_logprobs``: the temperature-1 log-softmax of the model's logits, before temperature,
top-k/top-p and logits processors — the quantity ``align.head.token_logprobs`` recomputes (tested to 1e-4 in fp32).

Sleep mode (GPU): ``sleep()`` before the training phase frees the KV cache (level 1 also offloads the weights to
CPU; level 2 discards them, so the next push must be complete); before the next rollout ``wake_weights()`` →
``load_weights()`` → ``wake()`` brings the weights back first and the KV cache last. vLLM has no sleep mode on CPU:
there sleep/wake only move the state machine (``rollouts/engine_state.py``) and log once.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch

from . import vllm_adapter as vx
from .engine import Completion, SamplingParams
from .engine_state import EngineError, EngineState, EngineStateError, StateMachine
from .timeouts import CallTimeout, call_with_timeout
from .weights import WeightCheck, checkpoint_shapes, tensor_bytes, weight_buckets

log = logging.getLogger("rollouts")

A, S, W = EngineState.AWAKE, EngineState.ASLEEP, EngineState.WEIGHTS_ONLY


def _seed_for(seed: int | None, prompt: int, n: int) -> int | None:
    # vLLM seeds the j-th of n samples of a request with seed + j; space the prompts n apart
    return None if seed is None else (seed * 1_000_003 + prompt * n) % (1 << 62)


class VLLMEngine:
    copies_weights = True  # the engine holds its own copy: the trainer must push updates

    def __init__(self, model: str, tokenizer, *, dtype: str = "float32", seed: int = 0,
                 max_model_len: int | None = None, sleep_level: int = 1, bucket_mb: float = 1024,
                 push_timeout_s: float | None = 600.0, enforce_eager: bool | None = None,
                 llm_kwargs: dict | None = None, weight_version: int = 0):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights to CPU) or 2 (discard them), got {sleep_level}")
        facts = vx.platform_facts()
        self.on_cpu = facts["cpu"]
        self.sleep_supported = facts["sleep_mode"]
        extra = dict(llm_kwargs or {})
        if self.on_cpu and "kv_cache_memory_bytes" not in extra and "gpu_memory_utilization" not in extra:
            # vLLM's CPU default reserves 92% of the machine's memory for the KV cache
            extra["kv_cache_memory_bytes"] = 1 << 30
            log.info("vLLM on CPU: KV cache of 1 GiB (set engine.options.kv_cache_memory_bytes to change)")
        if not self.on_cpu and "gpu_memory_utilization" not in extra and "kv_cache_memory_bytes" not in extra:
            extra["gpu_memory_utilization"] = 0.3  # colocated with training: leave the rest to the trainer
            log.info("vLLM colocated with training: gpu_memory_utilization 0.3 (engine.options to change)")
        self.tokenizer = tokenizer
        self.model_path = model
        self.sleep_level = sleep_level
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.push_timeout_s = push_timeout_s
        self._state = StateMachine("the vLLM engine")
        self._weights_discarded = False
        self._sleep_noted = False  # the CPU no-op is logged once per engine
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.llm = vx.create_llm(model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                 enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
                                 enable_sleep_mode=self.sleep_supported, extra=extra)
        self.weight_version = int(weight_version)
        vx.set_weight_version(self.llm, self.weight_version)
        shapes = checkpoint_shapes(model)
        self._check = WeightCheck(shapes, tied_embeddings="lm_head.weight" not in shapes) if shapes else None
        self.eos_ids = sorted(_eos_ids(tokenizer, model))
        self.pushes = 0
        self.last_push: dict[str, float] = {}
        self.progress = False  # show vLLM's progress bar while generating (align eval / generate)

    # -------------------------------------------------------------------------------------------------- state
    @property
    def state(self) -> EngineState:
        return self._state.state

    def sleep(self) -> None:
        """Free the KV cache (and offload or discard the weights) for the training phase."""
        if self.state is S:
            return
        self._state.require("sleep", A)
        if self.sleep_supported:
            vx.sleep(self.llm, self.sleep_level)
            self._weights_discarded = self.sleep_level == 2
        elif not self._sleep_noted:
            self._sleep_noted = True
            log.info("vLLM has no sleep mode on this platform (CPU): sleep()/wake() only track the engine state")
        self._state.to(S)

    def wake_weights(self) -> None:
        """Bring the weights back (not the KV cache), so a push lands before the cache is re-allocated."""
        if self.state in (A, W):
            return
        self._state.require("wake its weights", S)
        if self.sleep_supported:
            vx.wake_up(self.llm, ["weights"])
        self._state.to(W)

    def wake(self) -> None:
        """Weights first, then the KV cache; ready to generate."""
        if self.state is A:
            return
        if self.state is S:
            self.wake_weights()
        self._state.require("wake", W)
        if self.sleep_supported:
            vx.wake_up(self.llm, ["kv_cache"])
        self._state.to(A)

    # --------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        self._state.require("generate", A)
        if self._weights_discarded:
            raise EngineStateError("the vLLM engine cannot generate: sleep(level=2) discarded its weights and no "
                                   "complete push has replaced them since")
        if not prompts:
            return []
        greedy = sampling.temperature <= 0
        params = [vx.sampling_params(n=n, temperature=0.0 if greedy else sampling.temperature,
                                     top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
                                     max_tokens=sampling.max_new_tokens, seed=_seed_for(sampling.seed, i, n),
                                     stop_token_ids=self.eos_ids)
                  for i in range(len(prompts))]
        raw = vx.generate(self.llm, prompts, params, progress=self.progress)
        out = []
        for i, comps in enumerate(raw):
            for tokens, lps, reason, stamp in comps:
                out.append(Completion(
                    prompt_index=i, prompt_ids=list(prompts[i]), token_ids=tokens, logprobs=lps,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason="stop" if reason == "stop" else "length",
                    weight_version=int(stamp) if stamp is not None and stamp.lstrip("-").isdigit()
                    else self.weight_version,
                ))
        return out

    # ------------------------------------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Replace the engine's weights in place (no restart) from a lazy stream of full tensors in HF naming.

        The stream is consumed bucket by bucket (``bucket_mb``, never splitting a layer); each bucket is one vLLM
        reload call that must finish within ``push_timeout_s``. Stamps ``version`` (default: previous + 1).
        Raises :class:`EngineError` naming the tensor or bucket on failure; the engine is then STALE (bad input
        caught before sending: push again) or BROKEN (vLLM failed or hung: recreate it).
        """
        self._state.require("load weights", A, W, EngineState.STALE)
        previous = self.state if self.state is not EngineState.STALE else A
        self._state.to(EngineState.UPDATING)
        t0 = time.perf_counter()
        sent = buckets = 0
        pushed: set[str] = set()
        stream = weight_buckets(self._checked(named_tensors, pushed), self.bucket_bytes)
        with vx.quiet_partial_reloads() as noise:
            while True:
                try:  # the source side: gathering, validation, bucketing
                    bucket = next(stream, None)
                except BaseException as e:
                    self._state.to(EngineState.STALE if buckets else previous,
                                   f"the weight stream failed after {buckets} bucket(s): {e}")
                    if not isinstance(e, Exception):
                        raise
                    raise EngineError(f"weight push stopped: {e}" + (
                        f"; {buckets} bucket(s) were already loaded, so the engine is stale until a complete push "
                        "succeeds" if buckets else "; nothing was sent")) from e
                if bucket is None:
                    break
                try:  # the engine side
                    self._reload(bucket)
                except BaseException as e:
                    reason = (f"weight push failed at bucket {buckets + 1} ({bucket[0][0]} … {bucket[-1][0]}): "
                              f"{type(e).__name__}: {e}")
                    self._state.to(EngineState.BROKEN, reason)
                    raise EngineError(reason + ". The in-process vLLM engine cannot be trusted after a failed "
                                      "reload; restart the run (it resumes from its last checkpoint)") from e
                buckets += 1
                sent += sum(tensor_bytes(t) for _, t in bucket)
                del bucket
        if not vx.reset_prefix_cache(self.llm):
            self._state.to(EngineState.BROKEN, "vLLM refused to reset its prefix cache after a push")
            raise EngineError("vLLM refused to reset its prefix cache after a weight push (requests still running?)")
        missing = self._check.missing(pushed) if self._check is not None else []
        if missing and self._weights_discarded:
            self._state.to(EngineState.STALE, f"{len(missing)} tensors were not pushed after sleep(level=2)")
            raise EngineError(f"weight push after sleep(level=2) left out {len(missing)} tensors (e.g. {missing[0]!r}); "
                              "level 2 discards the weights, so every tensor must be pushed")
        if missing:
            log.warning("weight push left out %d tensors (they keep their old values), e.g. %s", len(missing),
                        ", ".join(missing[:5]))
        if noise.not_loaded:
            log.warning("weight push: vLLM parameters no bucket updated (they keep their old values): %s",
                        ", ".join(sorted(noise.not_loaded)[:10]))
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        vx.set_weight_version(self.llm, self.weight_version)
        self._weights_discarded = False
        self.pushes += 1
        self.last_push = {"seconds": time.perf_counter() - t0, "bytes": float(sent), "buckets": float(buckets)}
        self._state.to(previous)

    def _checked(self, named_tensors, pushed: set[str]):
        for name, tensor in named_tensors:
            if self._check is not None:
                self._check(name, tensor)
            pushed.add(name)
            yield name, tensor

    def _reload(self, bucket) -> None:
        setup = None
        if self._cuda_device is not None:
            device = self._cuda_device
            setup = lambda: torch.cuda.set_device(device)  # noqa: E731 (the current device is per thread)
        try:
            call_with_timeout(vx.reload_weights, (self.llm, bucket), timeout=self.push_timeout_s, setup=setup)
        except CallTimeout as e:
            raise CallTimeout(f"vLLM's reload_weights {e} (engine.push_timeout_s)") from None

    def close(self) -> None:
        self._state.to(EngineState.BROKEN, "closed")
        self.llm = None


def _eos_ids(tokenizer, model_path: str) -> set[int]:
    ids = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(x) for x in eos)
    return ids

