"""Loads the optional native extensions, each on its own: lightllm._C (the C++ CPU kernels) and
lightllm._C_cuda (the CUDA kernels).

A missing or unloadable extension is not an error: the Triton and reference backends serve. The
two load independently, so a CUDA module that fails to load (built against another CUDA runtime,
say) leaves the C++ CPU kernels working. Each keeps its own reason for `python -m lightllm info`
and ``why_unavailable``, logged once at debug level.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

logger = logging.getLogger("lightllm")

_REBUILD = "rebuild with pip install --no-build-isolation -e ."


def _load(name: str, not_built: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it is not loaded)."""
    full = f"{__package__}.{name}"
    if importlib.util.find_spec(full) is None:
        reason = f"not built ({not_built})"
    else:
        try:
            return importlib.import_module(full), None
        except ImportError as exc:  # typically built against another torch or CUDA runtime
            reason = f"{type(exc).__name__}: {exc} ({_REBUILD})"
    logger.debug("%s not loaded (%s)", full, reason)
    return None, reason


_C, load_error = _load("_C", "a pure-Python install, LIGHTLLM_SKIP_NATIVE_BUILD=1, or no torch at build time")
_C_cuda, cuda_load_error = _load(
    "_C_cuda",
    "no CUDA toolkit at build time, nvcc's CUDA major version not torch's, LIGHTLLM_SKIP_CUDA_BUILD=1, or a "
    "pure-Python install",
)


def cpp_module() -> ModuleType | None:
    """lightllm._C (the C++ CPU kernels), or None."""
    return _C


def cuda_module() -> ModuleType | None:
    """lightllm._C_cuda (the CUDA kernels), or None."""
    return _C_cuda


def has_cpp() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C_cuda is not None


def build_summary() -> dict:
    """Per module: whether it is loaded, and what it was built for or why it is not loaded."""
    cpp = ({"loaded": True, "built_against_torch": _C.torch_version} if _C is not None
           else {"loaded": False, "reason": load_error})
    cuda = ({"loaded": True, "built_against_torch": _C_cuda.torch_version, "cuda_gencode": _C_cuda.cuda_gencode}
            if _C_cuda is not None else {"loaded": False, "reason": cuda_load_error})
    return {"cpp": cpp, "cuda": cuda}
