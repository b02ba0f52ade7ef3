"""Where experience comes from: generation engines, reward functions, and the sources that turn them into batches.

Never imports the trainer (``align``); heavy engines (vLLM) are imported lazily.
"""

from .engine import Completion, Engine, SamplingParams
from .rewards import load_reward, registered_rewards, reward
from .sources import DatasetSource
from .types import Example, Sample

__all__ = ["Completion", "DatasetSource", "Engine", "Example", "Sample", "SamplingParams", "load_reward",
           "registered_rewards", "reward"]
