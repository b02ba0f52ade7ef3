"""KL-regularised policy gradient: GRPO, Dr. GRPO, RLOO, REINFORCE++, RPG (LOSSES.md §0.2, §6).

``kl.py`` KL estimators and RPG surrogates · ``advantages.py`` advantage estimators · ``policy.py`` policy terms ·
``objective.py`` the unified objective (``kl_pg``) · ``presets.py`` named presets.
"""

from . import presets  # noqa: F401  (registers the presets)
from .objective import REWARD_KEY, KLPG, KLPGOptions

__all__ = ["KLPG", "KLPGOptions", "REWARD_KEY"]
