"""align: post-training for language models on one trainer with pluggable losses.

``import align`` stays light: the trainer, models and engines are imported where they are used.
"""

__version__ = "0.1.0"
