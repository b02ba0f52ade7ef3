"""Weight streams for pushing a policy into a generation engine: layer-aligned, size-bounded buckets.

A *weight source* is any iterable of ``(name, tensor)`` in Hugging Face naming, full (unsharded) tensors, in module
order: ``model.state_dict().items()`` for a plain model, or a generator that gathers a ZeRO-3 model one layer at a
time. The engine pulls from it lazily and sends a bucket as soon as the layer arriving would overflow ``max_bytes``,
so at most one bucket (≤ ``max_bytes``, or one layer larger than that) plus the layer being gathered is alive at any
moment; the whole model is never materialised a second time.

Buckets never split a transformer layer (``model.layers.7.*``): vLLM fuses q/k/v and gate/up projections of a layer
into one parameter and finishes loading it only when all its parts have arrived, so a layer cut across two reload
calls would be processed half-loaded.

Each tensor is kept as ``tensor.detach()`` (a new tensor object sharing the storage): a source that re-partitions a
parameter after yielding it (ZeRO-3 sets ``param.data`` to an empty tensor when a ``GatheredParameters`` context
exits) therefore does not empty a bucket that still holds that layer.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]

_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.7.mlp.up_proj.weight" → "model.layers.7"


def layer_key(name: str) -> str:
    """The unit that must travel in one bucket: a numbered block, or else the tensor's own module."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_buckets(named_tensors: NamedTensors, max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive layers grouped into lists of at most ``max_bytes`` (a single larger layer is its own bucket).

    Raises ``ValueError`` when a layer's tensors are not contiguous in the stream (they would have to be split).
    """
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []  # complete layers waiting to be sent
    bucket_size = 0
    layer: list[tuple[str, torch.Tensor]] = []  # the layer still arriving
    layer_size = 0
    current: str | None = None
    done: set[str] = set()

    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        key = layer_key(name)
        if key != current:
            if key in done:
                raise ValueError(f"the weights of {key!r} are not contiguous in the weight stream ({name!r} comes "
                                 "after other layers); yield each layer's tensors together, in module order")
            if current is not None:
                done.add(current)
            bucket += layer
            bucket_size += layer_size
            layer, layer_size, current = [], 0, key
        layer.append((name, tensor.detach()))
        layer_size += tensor_bytes(tensor)
        if bucket and bucket_size + layer_size > max_bytes:  # send now: the layer in progress will not fit
            yield bucket
            bucket, bucket_size = [], 0
    bucket += layer
    if bucket:
        yield bucket


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of the safetensors checkpoint in folder ``path`` (headers only), or None when there is none."""
    import glob
    import os

    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


class WeightCheck:
    """Names and shapes a push must match, from the checkpoint the engine was started from.

    A tied model's checkpoint omits ``lm_head.weight``; its state_dict still has it (the same tensor as the input
    embedding), and vLLM's CPU backend keeps its own copy of the LM head, so that one extra name is accepted.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], tied_embeddings: bool):
        self.shapes = dict(shapes)
        self.required = set(shapes)
        if tied_embeddings and "lm_head.weight" not in self.shapes:
            embed = [s for n, s in self.shapes.items() if n.endswith("embed_tokens.weight")]
            if embed:
                self.shapes["lm_head.weight"] = embed[0]

    def missing(self, pushed: set[str]) -> list[str]:
        return sorted(self.required - pushed)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        want = self.shapes.get(name)
        if want is None:
            import difflib

            close = difflib.get_close_matches(name, list(self.shapes), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"weight {name!r} is not a tensor of the engine's model{hint} (push Hugging Face names, "
                             "as in model.state_dict())")
        if tuple(tensor.shape) != want:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the engine's model has {want} (push "
                             "full, unsharded tensors: gather ZeRO-3 parameters first)")
