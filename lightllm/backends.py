"""Backend selection for lightllm's ops.

Every op has a pure-PyTorch reference ("torch") and device kernels: "triton" (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1), "cuda" (the CUDA kernels, extension lightllm._C_cuda) and "cpp"
(the C++ CPU kernels, extension lightllm._C; each extension loads on its own). The backend that
runs is, in order of precedence:

1. the innermost ``with lightllm.use_backend(name):``
2. ``lightllm.set_backend(name)``
3. the environment variable ``LIGHTLLM_BACKEND``
4. the automatic default for the op and the tensor's device (``"auto"``).

A backend chosen by name must be available (built, with its device present) and, when the op has a
kernel in it, able to run on the tensor's device; otherwise the call raises
:class:`BackendUnavailableError` saying why. An op that has no kernel at all in the chosen backend
(``python -m lightllm info`` lists each op's backends) runs its automatic default instead, and says
so once in the log, so that a whole workflow (a layer's forward and backward, say) can run with one
backend chosen while its kernels are still being written.

The automatic default on a GPU is a kernel only where it passed on the card's architecture
(``sm_90``...): in :data:`GPU_VERIFIED`, the built-in record of our own GPU runs (card and commit
there and in benchmarks/RESULTS.md), or in this card's own self-test record
(``python -m lightllm selftest``, see :mod:`lightllm.selftest`) for this very build. A pass on an
H100 says nothing about the shared memory or instructions of an RTX 4090. Otherwise the reference
runs. On the CPU it is the C++ kernel (unless this machine's self-test failed it), else the
reference. ``python -m lightllm info`` shows each default and where it comes from. The ``cuda``
backend is unavailable, with the reason, on a card that none of the extension's compiled images
(SASS, or PTX the driver can JIT) runs on.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import _native

logger = logging.getLogger("lightllm")

BACKENDS = ("cuda", "triton", "cpp", "torch")
_CHOICES = BACKENDS + ("auto",)

# (op, backend, architecture like "sm_90") -> record of the GPU run that verified it. Only these
# may be a GPU default, and only on cards of that architecture. Nothing has run on a real card yet:
# every GPU default is the reference until this is filled in from a device_check.sh run (see
# benchmarks/RESULTS.md).
GPU_VERIFIED: dict[tuple[str, str, str], dict[str, object]] = {}

# Preferred order among verified GPU kernels, fastest first.
_GPU_PREFERENCE = ("cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here (not built, no device, or no implementation)."""


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    devices: tuple[str, ...]  # device types the implementation accepts


# op name -> backend -> implementation
_REGISTRY: dict[str, dict[str, Implementation]] = {}

_global_choice: str | None = None
_fallbacks_logged: set[tuple[str, str]] = set()
_recorders: list[list["Dispatch"]] = []  # open record_dispatches() blocks
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("lightllm_backend", default=None)


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"unknown lightllm backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name.lower()


@dataclass
class Dispatch:
    """One op call as :func:`record_dispatches` saw it."""

    op: str
    chosen: str  # the backend asked for ("auto" for the per-op defaults)
    ran: str  # the backend whose implementation executed
    fallback: str | None = None  # why ``ran`` is not ``chosen``'s own kernel (None when it is, or for "auto")


@contextlib.contextmanager
def record_dispatches() -> Iterator[list[Dispatch]]:
    """Record every op call made inside the block: which backend was asked for and which
    implementation ran, including an implementation that hands a call on (the CUDA LoRA kernel for
    more than 16 rows, say). Tests use it to prove that the kernel they claim is the one that ran."""
    calls: list[Dispatch] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        # by identity: a nested block's list can equal the outer one's (the same calls recorded)
        del _recorders[next(i for i, recorder in enumerate(_recorders) if recorder is calls)]


def note_handover(op: str, backend: str, ran: str, reason: str) -> None:
    """Called by ``backend``'s implementation of ``op`` when it hands this call to ``ran``'s."""
    for calls in _recorders:
        for call in reversed(calls):
            if call.op == op and call.ran == backend:
                call.ran, call.fallback = ran, reason
                break


def register(op: str, backend: str, devices: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` for ``devices``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, devices)
        return fn

    return deco


def set_backend(name: str | None) -> None:
    """Choose the backend for all ops in this process ("cuda", "triton", "cpp", "torch", or "auto")."""
    global _global_choice
    if name is None:
        _global_choice = None
        return
    choice = _validate(name)
    if choice != "auto" and choice not in available_backends():
        raise BackendUnavailableError(f"backend {choice!r} is not available here: {why_unavailable(choice)}")
    _global_choice = None if choice == "auto" else choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run ops inside the block with ``name`` ("auto" restores the defaults)."""
    choice = _validate(name)
    if choice != "auto" and choice not in available_backends():
        raise BackendUnavailableError(f"backend {choice!r} is not available here: {why_unavailable(choice)}")
    token = _scoped_choice.set(choice)
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def get_backend() -> str:
    """The backend chosen by name ("auto" when the per-op defaults apply)."""
    scoped = _scoped_choice.get()
    if scoped is not None:
        return scoped
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get("LIGHTLLM_BACKEND", "").strip()
    if env:
        try:
            return _validate(env)
        except ValueError as exc:
            raise ValueError(f"LIGHTLLM_BACKEND: {exc}") from None
    return "auto"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def why_unavailable(backend: str) -> str | None:
    """None if ``backend`` can run in this process, else the reason."""
    if backend == "torch":
        return None
    if backend == "cpp":
        return None if _native.has_cpp() else f"lightllm._C is not loaded ({_native.load_error})"
    if backend == "cuda":
        if not _native.has_cuda_kernels():
            return f"lightllm._C_cuda is not loaded ({_native.cuda_load_error})"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if not torch.cuda.is_initialized():
            # reading the card would start CUDA in this process (and break fork-based workers later):
            # the check runs once CUDA is up, as it is when an op sees a CUDA tensor
            return None
        return cuda_image_problem(_device_capability(None), _native.cuda_module().cuda_gencode)
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "no CUDA device is visible (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
        return None
    return f"unknown backend {backend!r}"


def _device_capability(index: int | None) -> tuple[int, int]:
    """(major, minor) of a CUDA device (the current one for None)."""
    return _capability_of(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)  # asked on every op call on a GPU once GPU_VERIFIED has entries
def _capability_of(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_arch(index: int | None = None) -> str | None:
    """The architecture name GPU_VERIFIED is keyed by: "sm_90" for compute capability 9.0 (None
    when no CUDA device is visible)."""
    if not torch.cuda.is_available():
        return None
    major, minor = _device_capability(index)
    return f"sm_{major}{minor}"


def compiled_images(gencode: str) -> tuple[list[str], list[str]]:
    """(SASS targets like "sm_80", "sm_90a"; PTX targets like "compute_90") of nvcc -gencode flags."""
    sass, ptx = [], []
    for codes in re.findall(r",code=\[?([\w,]+)", gencode):  # "-gencode=arch=compute_80,code=sm_80"
        for code in codes.split(","):
            target = sass if code.startswith("sm_") else ptx
            if code not in target:
                target.append(code)
    return sass, ptx


@functools.lru_cache(maxsize=None)  # asked on every op call that names the cuda backend
def cuda_image_problem(capability: tuple[int, int], gencode: str) -> str | None:
    """Why the extension's CUDA kernels cannot run on a card of ``capability``, None if one image can:
    SASS for sm_XY runs on XY and later minors of the same major; an arch-specific sm_XYa only on
    XY; a family-specific sm_XYf / compute_XYf on cards of major X from XY on; PTX for compute_XY is
    compiled by the driver for XY and every later card."""
    sass, ptx = compiled_images(gencode)
    card = capability[0] * 10 + capability[1]

    def runs(code: str, any_later_major: bool) -> bool:
        digits = code.split("_", 1)[1]
        n = int(digits.rstrip("af"))
        if digits.endswith("a"):
            return n == card
        if digits.endswith("f") or not any_later_major:
            return n // 10 == card // 10 and n <= card
        return n <= card

    if any(runs(code, False) for code in sass) or any(runs(code, True) for code in ptx):
        return None
    images = ", ".join(sass + [f"PTX {c}" for c in ptx]) or "no architecture"
    return (f"lightllm._C_cuda's kernels are built for {images}; this card is sm_{card}, which none of them runs on "
            f"(rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} where the CUDA toolkit and torch "
            "still support that architecture)")


def available_backends() -> list[str]:
    """Backends that can run in this process, fastest first."""
    return [b for b in BACKENDS if why_unavailable(b) is None]


def _runs_on(backend: str, impl: Implementation, device_type: str) -> bool:
    if device_type not in impl.devices:
        return False
    if backend == "triton" and device_type == "cpu":
        return triton_interpreted()
    return True


def default_backend(op: str, device_type: str, device_index: int | None = None) -> str:
    """The automatic choice for ``op`` on ``device_type`` (see the module docstring)."""
    return default_choice(op, device_type, device_index)[0]


def default_choice(op: str, device_type: str, device_index: int | None = None) -> tuple[str, str]:
    """(the automatic backend for ``op`` on ``device_type``, where that choice comes from): on a GPU a
    kernel is the default only with a pass on this architecture, from the built-in GPU_VERIFIED or
    from this card's own self-test (lightllm.selftest); on the CPU the C++ kernel unless this
    machine's self-test failed it."""
    from . import selftest  # imports this module

    impls = _REGISTRY.get(op, {})
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "torch", "reference"
        arch = device_arch(device_index)
        for backend in _GPU_PREFERENCE:
            if backend not in impls or why_unavailable(backend) is not None:
                continue
            if (op, backend, arch) in GPU_VERIFIED:
                return backend, "built-in record"
            if selftest.local_result(op, backend, "cuda", device_index):
                return backend, "local self-test"
        return "torch", "reference"
    if device_type == "cpu" and "cpp" in impls and why_unavailable("cpp") is None:
        if selftest.local_result(op, "cpp", "cpu") is False:
            return "torch", "reference (C++ kernel failed the local self-test)"
        return "cpp", "C++ kernel"
    return "torch", "reference"


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """The backend name and implementation that will run ``op`` for tensors on ``device``."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementations registered for op {op!r}")
    choice = get_backend()
    backend = default_backend(op, device.type, device.index) if choice == "auto" else choice
    reason = why_unavailable(backend)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not available: {reason}")
    impl = impls.get(backend)
    fallback = None
    if impl is None:
        default = default_backend(op, device.type, device.index)
        fallback = f"{op} has no {backend!r} kernel"
        if (op, backend) not in _fallbacks_logged:
            _fallbacks_logged.add((op, backend))
            logger.info("%s; running its default %r instead", fallback, default)
        backend, impl = default, impls[default]
    if not _runs_on(backend, impl, device.type):
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} cannot run on {device.type} tensors"
            + (" (Triton runs on the CPU only with TRITON_INTERPRET=1)" if backend == "triton" else "")
        )
    if _recorders:
        for calls in _recorders:
            calls.append(Dispatch(op, choice, backend, fallback))
    return backend, impl.fn


def has_kernel(op: str, backend: str, device_type: str) -> bool:
    """Whether ``op`` has its own ``backend`` kernel for ``device_type`` tensors that can run here
    (no fallback to the op's default counted)."""
    impl = _REGISTRY.get(op, {}).get(backend)
    return impl is not None and why_unavailable(backend) is None and _runs_on(backend, impl, device_type)


def op_table() -> list[dict]:
    """Per op: implemented backends, the defaults for CPU and CUDA, and GPU verification records."""
    rows = []
    for op, impls in sorted(_REGISTRY.items()):
        rows.append(
            {
                "op": op,
                "implemented": [b for b in BACKENDS if b in impls],
                "default_cpu": default_backend(op, "cpu"),
                "default_cpu_source": default_choice(op, "cpu")[1],
                "default_cuda": default_backend(op, "cuda"),
                "default_cuda_source": default_choice(op, "cuda")[1],
                "gpu_verified": {f"{b} {arch}": record for (o, b, arch), record in sorted(GPU_VERIFIED.items())
                                 if o == op},
            }
        )
    return rows
