"""Loads the optional native extension lightllm._C (C++ CPU kernels, CUDA kernels when built).

A missing or unloadable extension is not an error: the Triton and reference backends serve.
The reason is kept for `python -m lightllm info` and logged once at debug level.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("lightllm")

try:
    from . import _C  # type: ignore[attr-defined]

    load_error: str | None = None
except ImportError as exc:  # not built (pure-Python install) or built against another torch
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"
    logger.debug("lightllm._C not loaded (%s); native backends unavailable", load_error)


def native_module():
    """The extension module, or None."""
    return _C


def has_cpp() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def build_summary() -> dict:
    if _C is None:
        return {"native": False, "reason": load_error}
    return {
        "native": True,
        "cuda_kernels": bool(_C.built_with_cuda()),
        "cuda_gencode": _C.cuda_gencode,
        "built_against_torch": _C.torch_version,
    }
