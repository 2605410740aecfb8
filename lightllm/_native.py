"""Loads the optional native extension lightllm._C (C++ CPU kernels, CUDA kernels when built).

A missing or unloadable extension is not an error: the Triton and reference backends serve.
The reason is kept for `python -m lightllm info` and logged once at debug level.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger("lightllm")

_C = None
load_error: str | None = None
if importlib.util.find_spec(f"{__package__}._C") is None:
    load_error = "not built (a pure-Python install, LIGHTLLM_SKIP_NATIVE_BUILD=1, or no torch at build time)"
else:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # typically built against another torch: rebuild
        load_error = f"{type(exc).__name__}: {exc} (rebuild with pip install --no-build-isolation -e .)"
if load_error is not None:
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
