"""KL-regularised policy gradient: GRPO, Dr. GRPO, RLOO, REINFORCE++, RPG (LOSSES.md §0.2, §6).

The shared pieces, pure functions in tables: ``kl.py`` KL estimators and RPG surrogates · ``advantages.py``
advantage estimators · ``policy.py`` policy terms. ``objective.py`` composes them into the research loss ``kl_pg``
(every piece an option); one file per method picks the pieces of its paper's equation: ``grpo.py``, ``dr_grpo.py``,
``rloo.py``, ``reinforce_pp.py``, ``rpg.py``.
"""

from . import grpo, dr_grpo, rloo, reinforce_pp, rpg  # noqa: F401  (registers them; this order is `align losses`'s)
from .objective import REWARD_KEY, KLPG, KLPGOptions

__all__ = ["KLPG", "KLPGOptions", "REWARD_KEY"]
