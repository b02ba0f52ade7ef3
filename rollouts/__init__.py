"""Where experience comes from: generation engines, reward functions, and the sources that turn them into batches.

Never imports the trainer (``align``); heavy engines (vLLM) are imported lazily: ``rollouts.vllm_engine.VLLMEngine``
imports vLLM only when one is created.
"""

from .engine import Completion, Engine, SamplingParams
from .engine_state import EngineError, EngineState, EngineStateError
from .rewards import load_reward, registered_rewards, reward
from .rollout_source import PromptItem, RolloutSource
from .scoring import RewardError, RewardTerm, Scorer
from . import reasoning_gym_reward  # noqa: F401  (registers `reasoning_gym`; imports reasoning-gym only when used)
from .sources import DatasetSource
from .types import Example, Sample

__all__ = ["Completion", "DatasetSource", "Engine", "EngineError", "EngineState", "EngineStateError", "Example",
           "PromptItem", "RewardError", "RewardTerm", "RolloutSource", "Sample", "SamplingParams", "Scorer",
           "load_reward", "registered_rewards", "reward"]
