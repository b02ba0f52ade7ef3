"""Training objectives: one small file per family, each a class behind one protocol, found through a registry.

This package imports only torch. ``import losses`` registers every built-in loss.
"""

from .base import NEEDS, OUTPUTS, Loss, LossContext, OptionError, check
from .batch import Batch
from .reduce import AGGREGATIONS, aggregate, masked_mean
from .registry import get_loss_class, register, registered

from . import asft, bond, dpo, jbond, pg, psft, reward, simpo, sft  # noqa: F401  (registers built-in losses)

__all__ = [
    "AGGREGATIONS", "NEEDS", "OUTPUTS", "Batch", "Loss", "LossContext", "OptionError", "aggregate", "check",
    "get_loss_class", "masked_mean", "register", "registered",
]
