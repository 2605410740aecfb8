"""Self-test of lightllm's kernels on this machine's own card (``python -m lightllm selftest``).

Every kernel was written against the reference; whether it computes the right thing on a given card
(its shared memory, its instructions, its driver's JIT) is only known by running it there. For
each (op, backend) with a kernel that can run on the device, the self-test runs a fixed sweep of
shapes and dtypes (awkward sizes, bf16 included, CUDA-graph replay where the op supports it) through
the op itself with that backend chosen, and compares each result with the reference and a float64
computation. Each (op, backend) runs in its own child process, so a crash or an illegal memory
access fails only that entry.

The record (card, architecture, driver, versions, a fingerprint of the kernel code, and per op and
backend: passed, worst relative error, cases run, seconds) is written atomically to
``$LIGHTLLM_CACHE`` (default ``~/.cache/lightllm``), one file per card. The dispatcher reads it:
on that card, with that same kernel code and versions, kernels that passed become the GPU
defaults next to the built-in :data:`lightllm.backends.GPU_VERIFIED`, and a C++ CPU kernel that
failed stops being the CPU default. A record from another card, version or build is ignored with
one warning.

Kernels a plugin registers (``backends.register``) can be self-tested too: register a sweep with
:func:`sweep_for` in a module and pass its name in ``imports``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import backends

logger = logging.getLogger("lightllm")

RECORD_FORMAT = 1
_RESULT_MARK = "LIGHTLLM-SELFTEST-RESULT "
_KERNEL_BACKENDS = ("cuda", "triton", "cpp")


# ---- where records live and which record applies -----------------------------------------------

def cache_dir() -> pathlib.Path:
    """``$LIGHTLLM_CACHE``, else ``$XDG_CACHE_HOME/lightllm``, else ``~/.cache/lightllm``."""
    explicit = os.environ.get("LIGHTLLM_CACHE", "").strip()
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "lightllm"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def record_path(device_type: str, device_index: int | None = None) -> pathlib.Path:
    """The record file for this card: one per architecture and card name (or one for the CPU)."""
    if device_type == "cpu":
        return cache_dir() / "selftest-cpu.json"
    ident = device_identity("cuda", device_index)
    return cache_dir() / f"selftest-{ident['arch']}-{_safe(ident['card'])}.json"


def device_identity(device_type: str, device_index: int | None = None) -> dict[str, str]:
    """card, arch and driver of the device a record is about."""
    if device_type == "cpu":
        return {"card": _cpu_name(), "arch": "cpu", "driver": ""}
    index = torch.cuda.current_device() if device_index is None else device_index
    return {"card": _card_name(index), "arch": backends.device_arch(index) or "", "driver": _driver_version()}


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=1)
def _driver_version() -> str:
    try:  # the driver's own CUDA version, e.g. 13000 -> "13.0"; torch has no public getter for it
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return ""


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the code a self-test verifies: the native extensions' files and the Python sources of
    the kernels and ops (a rebuild or an edit changes it, so a record never vouches for other code)."""
    package = pathlib.Path(__file__).resolve().parent
    files = sorted(package.glob("_C*.so")) + sorted(package.glob("_C*.pyd"))
    files += sorted((package / "ops").glob("*.py"))
    files += sorted(pathlib.Path(p).resolve() for p in _kernel_sources())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _kernel_sources() -> list[str]:
    from . import kernels

    return [str(p) for folder in kernels.__path__ for p in pathlib.Path(folder).glob("*.py")]


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The git commit lightllm was installed from ("" when it is not a checkout)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _software() -> dict[str, str]:
    from . import __version__

    return {"lightllm": __version__, "torch": torch.__version__, "triton": _triton_version(),
            "fingerprint": code_fingerprint()}


def why_stale(record: dict, device_type: str, device_index: int | None = None) -> str | None:
    """None if ``record`` applies to this device and this build, else why not."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("ops"), dict):
        return "not a lightllm self-test record of this format"
    if record.get("device_type") != device_type:
        return f"it is about {record.get('device_type')!r}, not {device_type!r}"
    ident = device_identity(device_type, device_index)
    for key in ("arch", "card"):
        if record.get(key) != ident[key]:
            return f"it was run on {record.get(key)!r}, this is {ident[key]!r}"
    for key, value in _software().items():
        if record.get(key) != value:
            what = "the kernel code" if key == "fingerprint" else key
            return f"{what} changed since it was run ({record.get(key)!r}, now {value!r})"
    return None


_warned: set[str] = set()


def _read_record(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}


@functools.lru_cache(maxsize=None)
def local_record(device_type: str, device_index: int | None = None) -> dict | None:
    """The self-test record that applies to this device and build, or None. Read once per process
    (:func:`forget_records` to read again); a corrupt or stale file is ignored with one warning."""
    try:
        path = record_path(device_type, device_index)
    except (RuntimeError, AssertionError):  # no CUDA device after all
        return None
    record = _read_record(path)
    if record is None:
        return None
    reason = "it cannot be read: " + record["unreadable"] if "unreadable" in record else \
        why_stale(record, device_type, device_index)
    if reason is not None:
        if str(path) not in _warned:
            _warned.add(str(path))
            logger.warning("ignoring the self-test record %s: %s (run `python -m lightllm selftest` again)",
                           path, reason)
        return None
    return record


def forget_records() -> None:
    """Drop the records read so far (after a self-test wrote a new one, say)."""
    local_record.cache_clear()
    _warned.clear()


def local_result(op: str, backend: str, device_type: str, device_index: int | None = None) -> bool | None:
    """True/False when this device's applicable record says the kernel passed/failed, None if it has no
    entry for it."""
    record = local_record(device_type, device_index)
    if record is None:
        return None
    entry = record["ops"].get(op, {}).get(backend)
    return None if not isinstance(entry, dict) else bool(entry.get("passed"))


# ---- comparing one kernel with the reference ---------------------------------------------------

class _Refusal(Exception):
    """The sweep cannot run this (op, backend) here (says why)."""


@dataclass
class Checker:
    """Collects one (op, backend)'s comparisons. ``run`` calls the op with the backend chosen and
    notes whether that backend's kernel ran (a case handed to another implementation proves nothing
    about the kernel and is counted apart)."""

    op: str
    backend: str
    device: torch.device
    cases: int = 0
    handed_over: int = 0
    worst: float = 0.0
    failures: list[str] = field(default_factory=list)
    _kernel_ran: bool = False

    def run(self, fn: Callable, *args, **kwargs):
        with backends.use_backend(self.backend), backends.record_dispatches() as calls:
            out = fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mine = [c for c in calls if c.op == self.op]
        self._kernel_ran = bool(mine) and all(c.ran == self.backend for c in mine)
        return out

    def reference(self, fn: Callable, *args, **kwargs):
        with backends.use_backend("torch"):
            return fn(*args, **kwargs)

    def _count(self, label: str, ok: bool, error: float, detail: str) -> None:
        if not self._kernel_ran:
            self.handed_over += 1
            return
        self.cases += 1
        if math.isfinite(error):
            self.worst = max(self.worst, error)
        if not ok:
            self.failures.append(f"{label}: {detail}")

    def close(self, label: str, got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, slack: float = 4.0) -> None:
        """``got`` is as close to ``exact`` (float64) as the reference is, within a factor of two, or
        within ``slack`` roundings of the output's dtype (accumulation order differs, nothing more)."""
        if got.shape != exact.shape or got.dtype != ref.dtype:
            self._count(label, False, math.inf, f"shape/dtype {tuple(got.shape)} {got.dtype}, expected "
                                                f"{tuple(exact.shape)} {ref.dtype}")
            return
        exact = exact.double().cpu()
        scale = max(exact.abs().max().item(), 1e-30) if exact.numel() else 1.0
        err = (got.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
        err_ref = (ref.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
        bound = max(2 * err_ref, slack * torch.finfo(ref.dtype).eps * scale)
        ok = not math.isnan(err) and err <= bound
        self._count(label, ok, err / scale, f"max error {err:.3g} > bound {bound:.3g} (reference {err_ref:.3g})")

    def equal(self, label: str, got: torch.Tensor, ref: torch.Tensor, min_fraction: float = 1.0,
              tol: float = 0.0) -> None:
        """Bit-identical to the reference (NaN where it has NaN), or at least ``min_fraction`` of the
        elements within ``tol`` (8-bit state: a float rounding may move a value across a code)."""
        if got.shape != ref.shape or got.dtype != ref.dtype:
            self._count(label, False, math.inf, f"shape/dtype {tuple(got.shape)} {got.dtype}, expected "
                                                f"{tuple(ref.shape)} {ref.dtype}")
            return
        g, r = got.cpu(), ref.cpu()
        if g.is_floating_point():
            g64, r64 = g.double(), r.double()
            same = torch.isclose(g64, r64, rtol=tol, atol=tol, equal_nan=True) if tol else \
                (g64 == r64) | (g64.isnan() & r64.isnan())
            finite = torch.isfinite(r64) & torch.isfinite(g64)
            diff = (g64 - r64)[finite].abs()
            error = diff.max().item() / max(r64[finite].abs().max().item(), 1e-30) if diff.numel() else 0.0
        else:
            same = g == r
            error = 0.0 if bool(same.all()) else 1.0
        fraction = same.double().mean().item() if same.numel() else 1.0
        self._count(label, fraction >= min_fraction, error,
                    f"{fraction:.6f} of the elements match, needs {min_fraction}")

    def graph_replay(self, label: str, make_inputs: Callable[[int], tuple], fn: Callable) -> None:
        """Capture ``fn(*inputs)`` in a CUDA graph on a side stream (after one eager call), refill the
        inputs with new data, replay, and compare with an eager call on the new data, bit for bit."""
        if self.device.type != "cuda":
            return
        inputs = make_inputs(0)
        with backends.use_backend(self.backend):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                fn(*inputs)  # eager first: lazy state and autotuning stay out of the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    out = fn(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            fresh = make_inputs(1)
            for dst, src in zip(inputs, fresh):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize(self.device)
        replayed = [t.clone() for t in _tensors(out)]
        eager = _tensors(self.run(fn, *fresh))
        for i, (r, e) in enumerate(zip(replayed, eager)):
            self.equal(f"{label} graph replay output {i}", r, e)

    def summary(self, seconds: float) -> dict:
        passed = not self.failures and self.cases > 0
        if self.cases == 0:
            detail = f"the kernel never ran: all {self.handed_over} cases were handed to another implementation"
        else:
            detail = "; ".join(self.failures[:3]) + (f" (+{len(self.failures) - 3} more)" if len(self.failures) > 3
                                                      else "")
            if self.handed_over:
                detail = (detail + "; " if detail else "") + f"{self.handed_over} cases outside the kernel's range"
        return {"passed": passed, "max_error": self.worst, "cases": self.cases, "failed": len(self.failures),
                "seconds": round(seconds, 3), "detail": detail}


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


# ---- the sweeps -----------------------------------------------------------------------------------

_SWEEPS: dict[str, Callable[[Checker, bool], None]] = {}


def sweep_for(*ops: str) -> Callable:
    """Register ``fn(checker, small)`` as the self-test sweep of ``ops`` (``small``: CPU-sized)."""
    def wrap(fn):
        for op in ops:
            _SWEEPS[op] = fn
        return fn
    return wrap


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _float_dtypes(checker: Checker) -> list[torch.dtype]:
    if checker.device.type == "cuda":
        return [torch.float16, torch.bfloat16]
    if checker.backend == "triton":  # the interpreter computes bf16 wrongly (numpy has none)
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


@sweep_for("quantize_blockwise", "dequantize_blockwise")
def _blockwise(checker: Checker, small: bool) -> None:
    from . import functional as F

    dev = checker.device
    code = F.create_dynamic_map(True).to(dev)
    sizes = [1, 4095, 4096 * 3 + 5] + ([] if small else [(1 << 24) + 3])
    for blocksize in (64, 256, 4096):
        for dtype in _float_dtypes(checker):
            for n in sizes:
                x = (torch.randn(n, generator=_gen(n + blocksize)) * 3).to(dtype).to(dev)
                if n > 700:
                    x[7], x[300], x[600] = float("nan"), float("inf"), -float("inf")
                if n > 2 * blocksize + 700:
                    x[-blocksize:].zero_()  # an all-zero block: absmax 0 must not divide
                label = f"n={n} blocksize={blocksize} {str(dtype)[6:]}"
                ref_codes, ref_absmax = checker.reference(F.quantize_blockwise, x, code, blocksize)
                if checker.op == "quantize_blockwise":
                    codes, absmax = checker.run(F.quantize_blockwise, x, code, blocksize)
                    checker.equal(label + " codes", codes, ref_codes)
                    checker.equal(label + " absmax", absmax, ref_absmax)
                else:
                    ref = checker.reference(F.dequantize_blockwise, ref_codes, ref_absmax, code, blocksize, dtype)
                    got = checker.run(F.dequantize_blockwise, ref_codes, ref_absmax, code, blocksize, dtype)
                    checker.equal(label, got, ref)
    if checker.op == "quantize_blockwise":
        checker.graph_replay("n=65536", lambda s: (torch.randn(65536, generator=_gen(s)).to(dev), code),
                             lambda x, c: F.quantize_blockwise(x, c, 256))


@sweep_for("quantize_4bit", "dequantize_4bit")
def _fourbit(checker: Checker, small: bool) -> None:
    """Codes and absmax, then the dequantized values, bit for bit: odd counts (a padded last byte),
    short last blocks, an all-zero block."""
    dev = checker.device
    sizes = [1, 4095, 4096 * 3 + 5] + ([] if small else [(1 << 24) + 3])
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, 4096):
            for dtype in _float_dtypes(checker):
                for n in sizes:
                    x = (torch.randn(n, generator=_gen(n + blocksize)) * 3).to(dtype).to(dev)
                    if n > 2 * blocksize + 700:
                        x[blocksize:2 * blocksize].zero_()
                    label = f"{quant_type} n={n} blocksize={blocksize} {str(dtype)[6:]}"
                    q = torch.ops.lightllm.quantize_4bit
                    ref_packed, ref_absmax = checker.reference(q, x, blocksize, quant_type)
                    if checker.op == "quantize_4bit":
                        packed, absmax = checker.run(q, x, blocksize, quant_type)
                        checker.equal(label + " codes", packed, ref_packed)
                        checker.equal(label + " absmax", absmax, ref_absmax)
                    else:
                        dq = torch.ops.lightllm.dequantize_4bit
                        args = (ref_packed, ref_absmax, blocksize, quant_type, n, dtype)
                        checker.equal(label, checker.run(dq, *args), checker.reference(dq, *args))


@sweep_for("matmul_4bit")
def _fourbit_matmul(checker: Checker, small: bool) -> None:
    """Against float64 with the same 4-bit weight: K a multiple of the blocksize (the fused GEMV),
    K where blocks straddle rows, and more rows of x than the GEMV takes (17: dequantize + matmul);
    at blocksize 64 also double-quantized (the absmax as uint8 codes with the nested state, which
    the kernels decode themselves)."""
    from . import functional as F
    from .ops.fourbit import decode_nested_absmax

    dev = checker.device
    shapes = ((40, 96), (33, 256), (24, 200)) if small else ((4096, 4096), (1056, 4160), (777, 1000))
    rows = (1, 3, 16, 17) if small else (1, 2, 8, 16, 17, 256)
    nested_code = F.create_dynamic_map(signed=True).to(dev)
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, 128):
            for n, k in shapes:
                gen = _gen(n * k + blocksize)
                w = torch.randn(n, k, generator=gen)
                bias = torch.randn(n, generator=gen).to(dev)
                packed, absmax = checker.reference(torch.ops.lightllm.quantize_4bit, w.to(dev), blocksize, quant_type)
                variants = [("", absmax, ())]
                if blocksize == 64:  # double quantization, as nf4.quantize_4bit(compress_statistics=True) does it
                    offset = absmax.mean()
                    codes, nested_absmax = checker.reference(F.quantize_blockwise, absmax - offset, nested_code, 256)
                    variants.append((" nested", codes, (nested_absmax, nested_code, 256, offset.reshape(()))))
                for name, scales, nested in variants:
                    float_absmax = decode_nested_absmax(scales, *nested) if nested else scales
                    w64 = checker.reference(torch.ops.lightllm.dequantize_4bit, packed, float_absmax, blocksize,
                                            quant_type, n * k, torch.float64).view(n, k)
                    for dtype in _float_dtypes(checker):
                        for m in rows:
                            x = torch.randn(m, k, generator=_gen(m + k)).to(dtype).to(dev)
                            args = (x, packed, scales, blocksize, quant_type, n, bias, *nested)
                            exact = x.double() @ w64.t() + bias.to(dtype).double()
                            checker.close(f"{quant_type}{name} {n}x{k} blocksize={blocksize} m={m} {str(dtype)[6:]}",
                                          checker.run(torch.ops.lightllm.matmul_4bit, *args),
                                          checker.reference(torch.ops.lightllm.matmul_4bit, *args), exact)


@sweep_for("int8_linear")
def _int8_linear(checker: Checker, small: bool) -> None:
    """Threshold 0: the reference's bits. Threshold 2.5 (outlier columns in every case): against the
    reference's own pipeline in float64 (same codes, exact product, the 16-bit outlier part). On a
    GPU, CUDA graph replays with outliers (a kernel that synchronizes with the host cannot be captured)."""
    from .quantization.bnb import int8 as int8_format

    dev = checker.device
    shapes = ((40, 96), (33, 200)) if small else ((4096, 4096), (1056, 4160))
    rows = (1, 3, 16, 17) if small else (1, 2, 8, 16, 17, 256)
    for n, k in shapes:
        gen = _gen(n + k)
        cb, scb, _ = int8_format.int8_vectorwise_quant(torch.randn(n, k, generator=gen).half())
        cb, scb = cb.to(dev), scb.to(dev)
        bias = torch.randn(n, generator=gen).to(dev)
        for dtype in _float_dtypes(checker):
            for m in rows:
                x = (torch.randn(m, k, generator=_gen(m * k)) * 1.5).to(dtype).to(dev)
                label = f"{n}x{k} m={m} {str(dtype)[6:]}"
                op = torch.ops.lightllm.int8_linear
                checker.equal(label + " threshold 0", checker.run(op, x, cb, scb, bias, 0.0),
                              checker.reference(op, x, cb, scb, bias, 0.0))
                ca, sca, cols = int8_format.int8_vectorwise_quant(x.half(), 2.5)
                exact = (ca.double() @ cb.double().t()) * (sca.double()[:, None] * scb.double()[None, :]) / 127 ** 2
                exact = exact + bias.to(dtype).double()
                w_dq = int8_format.int8_vectorwise_dequant(cb[:, cols], scb).to(dtype)
                exact = exact + x[:, cols].double() @ w_dq.double().t()
                checker.close(label + " threshold 2.5", checker.run(op, x, cb, scb, bias, 2.5),
                              checker.reference(op, x, cb, scb, bias, 2.5), exact)
    # No host synchronization at a threshold: a CUDA graph captured on inputs with one set of outlier
    # columns replays inputs with another (found on the device at every call), 1 row and 80 (for a
    # kernel that multiplies many rows another way).
    n, k = shapes[0]
    cb, scb, _ = int8_format.int8_vectorwise_quant(torch.randn(n, k, generator=_gen(1)).half())
    cb, scb, bias = cb.to(dev), scb.to(dev), torch.randn(n, generator=_gen(2)).to(dev)

    def outlier_inputs(m):
        def make(seed):
            x = torch.randn(m, k, generator=_gen(seed + m)) * 1.5
            x[::2, 5 + 11 * seed] = 20.0
            return x.half().to(dev), cb, scb, bias, 6.0
        return make

    for m in (1, 80):
        checker.graph_replay(f"{n}x{k} m={m} threshold 6", outlier_inputs(m), torch.ops.lightllm.int8_linear)


def _gptq_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, device, seed: int):
    from .nn import QuantLinear

    gen = _gen(seed)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        linear.bias.copy_(torch.randn(n, generator=gen) / 4)
    layer = QuantLinear.from_linear(linear, bits, group_size, sym=bool(seed % 2), checkpoint_format="gptq_v2")
    if act_order:
        state = layer.state_dict()
        size = k if group_size == -1 else group_size
        state["g_idx"] = (torch.argsort(torch.randperm(k, generator=gen)) // size).int()
        layer.load_state_dict(state)
    return layer.to(device)


@sweep_for("gptq_matmul", "gptq_dequantize")
def _gptq(checker: Checker, small: bool) -> None:
    dev = checker.device
    k, n = (96, 64) if small else (4160, 1056)  # not tile multiples (3-bit packing needs 32 | K and N)
    rows = (1, 3, 9) if small else (1, 3, 8, 9, 33, 128)  # both sides of the GEMV limit (8 rows)
    for bits in (2, 3, 4, 8):
        for group_size, act_order in ((32, True), (128, False), (-1, False)) if not small else ((32, True), (-1, False)):
            layer = _gptq_layer(k, n, bits, group_size, act_order, dev, seed=bits * 7 + group_size)
            args = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, False)
            exact_w = checker.reference(layer.dequantize, torch.float64)
            for dtype in _float_dtypes(checker):
                label = f"{bits}-bit g{group_size}{' act-order' if act_order else ''} {str(dtype)[6:]}"
                if checker.op == "gptq_dequantize":
                    dq = torch.ops.lightllm.gptq_dequantize
                    checker.equal(label, checker.run(dq, *args[:5], False, dtype),
                                  checker.reference(dq, *args[:5], False, dtype))
                    continue
                for m in rows:
                    x = torch.randn(m, k, generator=_gen(m + bits)).to(dtype).to(dev)
                    exact = x.double() @ exact_w.t() + layer.bias.double()
                    checker.close(f"{label} m={m}", checker.run(layer, x), checker.reference(layer, x), exact)
    if checker.op == "gptq_matmul":
        layer = _gptq_layer(k, n, 4, 128 if k >= 128 else 32, False, dev, seed=3).half()
        checker.graph_replay("4-bit m=1", lambda s: (torch.randn(1, k, generator=_gen(s)).half().to(dev),), layer)


def _lora_case(m, k, n, r, dtype, device, seed, conv1d=False):
    gen = _gen(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    if conv1d:  # GPT-2's Conv1D stores [in, out]; the op gets the transposed view
        w = w.t().contiguous().t()
    bias = (torch.randn(n, generator=gen) / 4).to(dtype)
    a = torch.randn(r, k, generator=gen) / k ** 0.5
    b = torch.randn(n, r, generator=gen)
    return [t.to(device) for t in (x, w, bias, a, b)]


@sweep_for("lora_linear")
def _lora_linear(checker: Checker, small: bool) -> None:
    dev = checker.device
    shapes = ((72, 40, False), (40, 24, True)) if small else ((4096, 1056, False), (1032, 4104, False),
                                                             (520, 776, True))
    for m in ((1, 7, 16) if small else (1, 7, 16, 17, 512)):
        for r in ((1, 16) if small else (1, 16, 256)):
            for dtype in _float_dtypes(checker):
                for k, n, conv1d in shapes:
                    x, w, bias, a, b = _lora_case(m, k, n, r, dtype, dev, seed=m + r, conv1d=conv1d)
                    op = torch.ops.lightllm.lora_linear
                    y, s = checker.run(op, x, w, bias, a, b, 0.5)
                    ref_y, _ = checker.reference(op, x, w, bias, a, b, 0.5)
                    es = x.double() @ a.double().t()
                    ey = x.double() @ w.double().t() + 0.5 * es @ b.double().t() + bias.double()
                    label = f"m={m} r={r} {k}x{n}{' conv1d' if conv1d else ''} {str(dtype)[6:]}"
                    checker.close(label + " y", y, ref_y, ey)
                    checker.close(label + " s", s, es.float(), es, slack=64.0)  # float32 sum over K
    x, w, bias, a, b = _lora_case(4, 2048, 1024, 16, torch.float16, dev, seed=4)
    checker.graph_replay("m=4 r=16", lambda s: (torch.randn(4, 2048, generator=_gen(s)).half().to(dev), w, bias, a, b),
                         lambda *t: torch.ops.lightllm.lora_linear(*t, 0.5))


@sweep_for("lora_shrink", "lora_matmul", "lora_weight_grad")
def _lora_pieces(checker: Checker, small: bool) -> None:
    dev = checker.device
    for m, k, n, r in (((3, 72, 40, 5), (33, 40, 96, 16)) if small else
                       ((1, 4096, 1056, 16), (700, 1032, 776, 64), (33, 520, 4104, 1))):
        for dtype in _float_dtypes(checker):
            x, w, bias, a, b = _lora_case(m, k, n, r, dtype, dev, seed=m + k)
            label = f"m={m} k={k} n={n} r={r} {str(dtype)[6:]}"
            es = x.double() @ a.double().t()
            if checker.op == "lora_shrink":
                op = torch.ops.lightllm.lora_shrink
                checker.close(label, checker.run(op, x, a), checker.reference(op, x, a), es, slack=64.0)
            elif checker.op == "lora_matmul":
                op = torch.ops.lightllm.lora_matmul
                s = es.float()
                exact = x.double() @ w.double().t() + 0.5 * s.double() @ b.double().t() + bias.double()
                checker.close(label, checker.run(op, x, w, bias, s, b, 0.5),
                              checker.reference(op, x, w, bias, s, b, 0.5), exact)
            else:
                op = torch.ops.lightllm.lora_weight_grad
                v = torch.randn(m, r, generator=_gen(m)).to(dev)
                exact = 0.5 * x.double().t() @ v.double()
                checker.close(label, checker.run(op, x, v, 0.5), checker.reference(op, x, v, 0.5), exact, slack=64.0)


def _adapter_case(m, k, n, b, dtype, device, seed):
    gen = _gen(seed)
    z = torch.randn(m, k, generator=gen).to(dtype)
    res = torch.randn(m, n, generator=gen).to(dtype)
    wd = torch.randn(b, k, generator=gen) / k ** 0.5
    bd = torch.randn(b, generator=gen) / 4
    wu = torch.randn(n, b, generator=gen) / b ** 0.5
    bu = torch.randn(n, generator=gen) / 4
    return [t.to(device) for t in (z, res, wd, bd, wu, bu, torch.tensor([0.75]))]


_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


@sweep_for("bottleneck_adapter", "bottleneck_adapter_backward")
def _adapter(checker: Checker, small: bool) -> None:
    dev = checker.device
    for m, k, n, b, act in (((2, 72, 40, 3, "tanh"), (33, 96, 50, 16, "silu")) if small else
                            ((1, 4096, 4096, 64, "relu"), (7, 1032, 776, 16, "silu"), (600, 520, 1040, 256, "gelu"))):
        for dtype in _float_dtypes(checker):
            case = _adapter_case(m, k, n, b, dtype, dev, seed=m + b)
            label = f"m={m} k={k} n={n} bottleneck={b} {act} {str(dtype)[6:]}"
            leaves = [t.detach().double().requires_grad_() for t in case]
            z, res, wd, bd, wu, bu, s = leaves
            a64 = z @ wd.t() + bd
            y64 = res + s * (_ACTIVATIONS[act](a64) @ wu.t() + bu)
            op = torch.ops.lightllm.bottleneck_adapter
            if checker.op == "bottleneck_adapter":
                y, a = checker.run(op, *case, act)
                ref_y, ref_a = checker.reference(op, *case, act)
                checker.close(label + " y", y, ref_y, y64.detach())
                checker.close(label + " a", a, ref_a, a64.detach(), slack=64.0)
                continue
            grad = torch.randn(m, n, generator=_gen(7)).to(dtype).to(dev)
            want = torch.autograd.grad(y64, leaves[:1] + leaves[2:], grad.double())
            _, a = checker.reference(op, *case, act)
            args = (grad, case[0], a, case[2], case[4], case[5], case[6], act, [True] * 6)
            got = checker.run(torch.ops.lightllm.bottleneck_adapter_backward, *args)
            ref = checker.reference(torch.ops.lightllm.bottleneck_adapter_backward, *args)
            for name, g, r, e in zip(("dz", "dwd", "dbd", "dwu", "dbu", "ds"), got, ref, want):
                checker.close(f"{label} {name}", g, r, e.reshape(r.shape), slack=64.0)


_OPTIMIZERS = ("AdamW8bit", "Adam8bit", "Lion8bit", "SGD8bit")


def _optimizer(name: str, params, **kw):
    from . import optim

    settings = {"SGD8bit": dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
                "Lion8bit": dict(lr=1e-3, weight_decay=0.1)}.get(name, dict(lr=1e-2, weight_decay=0.1))
    return getattr(optim, name)(params, **{**settings, **kw})


def _params(sizes, dtype, device, seed=0):
    gen = _gen(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype).to(device)) for n in sizes]


def _steps(opt, params, count, seed=0):
    for step in range(count):
        gen = _gen(1000 + seed + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)
        opt.step()


@sweep_for("optimizer_step")
def _optimizer_step(checker: Checker, small: bool) -> None:
    dev = checker.device
    sizes = [1, 4095, 4096, 4097] + ([] if small else [1_000_003])
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if checker.backend == "triton" and dev.type == "cpu":
        dtypes = dtypes[:2]
    for name in _OPTIMIZERS:
        for dtype in dtypes:
            for bits in (8, 32):
                ref = _params(sizes, dtype, dev)
                got = _params(sizes, dtype, dev)
                ref_opt = _optimizer(name, ref, optim_bits=bits, min_8bit_size=1)
                opt = _optimizer(name, got, optim_bits=bits, min_8bit_size=1)
                checker.reference(_steps, ref_opt, ref, 4)
                checker.run(_steps, opt, got, 4)
                tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
                exact = 1.0 if bits == 32 else 0.9999  # 8-bit: a rounding may cross a code boundary, rarely
                for i, (g, r) in enumerate(zip(got, ref)):
                    checker.equal(f"{name} {bits}-bit {str(dtype)[6:]} n={sizes[i]} param", g.detach(), r.detach(),
                                  min_fraction=exact, tol=tol)
    if dev.type == "cuda":
        _optimizer_graph_replay(checker)


def _optimizer_graph_replay(checker: Checker) -> None:
    """Three replays of a captured step equal three eager steps from a cloned state, bit for bit."""
    dev = checker.device
    params = _params([5000, 70_001], torch.float32, dev)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-3, device=dev)
    opt, twin_opt = _optimizer("AdamW8bit", params, lr=lr), _optimizer("AdamW8bit", twins, lr=lr.clone())
    with backends.use_backend(checker.backend):
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=_gen(5)).to(dev)
            t.grad = p.grad.clone()
        opt.step()
        twin_opt.step()  # eager first: the state exists before the capture
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            opt.step()
        torch.cuda.current_stream(dev).wait_stream(side)
        for step in range(3):
            for p, t in zip(params, twins):
                p.grad.copy_(torch.randn(p.shape, generator=_gen(10 + step)).to(dev))
                t.grad.copy_(p.grad)
            graph.replay()
            twin_opt.step()
        torch.cuda.synchronize(dev)
    checker._kernel_ran = True  # both sides ran the claimed backend: the comparison is kernel vs kernel
    for i, (p, t) in enumerate(zip(params, twins)):
        checker.equal(f"graph replay vs eager param {i}", p.detach(), t.detach())
        for key in ("state1", "state2"):
            checker.equal(f"graph replay vs eager param {i} {key}", opt.state[p][key], twin_opt.state[t][key])


@sweep_for("gptq_solve_block")
def _solver(checker: Checker, small: bool) -> None:
    from .quantization import gptq_solve

    dev = checker.device
    cases = ((24, 160, 4, 32, True), (19, 96, 3, -1, False), (8, 136, 2, 64, True)) if small else \
        ((4096, 4096, 4, 128, False), (1056, 4160, 3, 128, True), (777, 1032, 8, -1, False))
    for n, k, bits, group_size, act_order in cases:
        gen = _gen(k)
        x = torch.randn(1024, k, generator=gen) @ torch.randn(k, k, generator=gen) / k ** 0.5
        x[:, ::max(1, k // 8)] *= 6  # strongly non-isotropic with outlier features, as real activations
        h = (2 * x.t() @ x / x.shape[0]).to(dev)
        w = torch.randn(n, k, generator=gen).to(dev)
        got = checker.run(gptq_solve, w, h, bits, group_size, True, act_order)
        ref = checker.reference(gptq_solve, w, h, bits, group_size, True, act_order)
        label = f"{n}x{k} {bits}-bit g{group_size}{' act-order' if act_order else ''}"
        # float rounding order may flip a code exactly at a rounding boundary, and the error follows
        checker.equal(label + " codes", got.q, ref.q, min_fraction=0.99)
        checker.equal(label + " g_idx", got.g_idx, ref.g_idx)
        checker._count(label + " loss", abs(got.error - ref.error) <= 0.01 * ref.error,
                       abs(got.error - ref.error) / max(ref.error, 1e-30), f"loss {got.error:.6g} vs {ref.error:.6g}")


# ---- running it ---------------------------------------------------------------------------------

def _child(op: str, backend: str, device: str, small: bool) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    sweep = _SWEEPS.get(op)
    if sweep is None:
        raise _Refusal(f"no self-test sweep for op {op!r}")
    checker = Checker(op, backend, dev)
    start = time.perf_counter()
    sweep(checker, small)
    return checker.summary(time.perf_counter() - start)


def _candidates(device: torch.device, ops: Iterable[str] | None, backend_names: Iterable[str] | None) -> list:
    wanted_ops = set(ops) if ops else None
    wanted = tuple(backend_names) if backend_names else _KERNEL_BACKENDS
    pairs = []
    for row in backends.op_table():
        if wanted_ops is not None and row["op"] not in wanted_ops:
            continue
        for backend in wanted:
            if backend in row["implemented"] and backends.has_kernel(row["op"], backend, device.type):
                pairs.append((row["op"], backend))
    return pairs


def run_selftest(device: str | torch.device = "cuda", ops: Iterable[str] | None = None,
                 backend_names: Iterable[str] | None = None, timeout: float = 600.0, small: bool | None = None,
                 imports: Iterable[str] = (), save: bool = True, progress: bool = True,
                 json_path: str | os.PathLike | None = None) -> dict:
    """Self-test every (op, backend) kernel that can run on ``device`` against the reference, each in
    a child process; returns the record and (``save``) writes it where the dispatcher reads it.

    ``ops`` / ``backend_names`` narrow the sweep (a narrowed run still writes only what it ran);
    ``small`` uses CPU-sized shapes (default: on the CPU); ``imports`` are modules the child imports
    first (plugins that register ops and sweeps); ``timeout`` is per (op, backend), in seconds.
    ``json_path``: a copy of the record, rewritten after every (op, backend) with ``"complete":
    false`` until the end, so a run stopped from outside still leaves what it finished.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("selftest --device cuda: no CUDA device is visible")
        torch.cuda.init()  # the cuda backend's image check reads the card only once CUDA is up
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    elif device.type != "cpu":
        raise ValueError(f"selftest runs on 'cpu' or 'cuda' devices, not {device.type!r}")
    imports = list(imports)
    for name in imports:
        __import__(name)
    small = device.type == "cpu" if small is None else small
    pairs = _candidates(device, ops, backend_names)
    if ops and not pairs:
        raise ValueError(f"none of the ops {sorted(ops)} has a kernel that can run on {device} here "
                         "(`python -m lightllm info` lists each op's backends)")
    ident = device_identity(device.type, device.index)
    record = {"format": RECORD_FORMAT, "device_type": device.type, **ident, **_software(),
              "commit": source_commit(), "python": platform.python_version(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "small": small, "complete": False, "ops": {}}
    for op, backend in tqdm(pairs, desc="selftest", unit="kernel", disable=not progress):
        result = _run_child(op, backend, str(device), small, timeout, imports)
        record["ops"].setdefault(op, {})[backend] = result
        if json_path is not None:
            _write_atomically(pathlib.Path(json_path), record)
        level = logging.INFO if result["passed"] else logging.WARNING
        logger.log(level, "%-28s %-7s %s  %s", op, backend, "passed" if result["passed"] else "FAILED",
                   result.get("detail", ""))
    record["complete"] = True
    if json_path is not None:
        _write_atomically(pathlib.Path(json_path), record)
    if save and pairs:
        path = record_path(device.type, device.index)
        previous = _read_record(path)
        if previous and "unreadable" not in previous and why_stale(previous, device.type, device.index) is None:
            # a narrowed run adds to the record of the same build instead of dropping what it did not run
            merged = previous["ops"]
            for op, results in record["ops"].items():
                merged.setdefault(op, {}).update(results)
            record["ops"] = merged
        _write_atomically(path, record)
        forget_records()
        record["path"] = str(path)
    return record


def _run_child(op: str, backend: str, device: str, small: bool, timeout: float, imports: list[str]) -> dict:
    command = [sys.executable, "-m", "lightllm.selftest", "--child", op, backend, "--device", device]
    command += ["--small"] if small else []
    for name in imports:
        command += ["--import", name]
    env = {**os.environ, "LIGHTLLM_BACKEND": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"passed": False, "max_error": None, "cases": 0, "failed": 0, "seconds": round(timeout, 3),
                "detail": f"timed out after {timeout:.0f} s"}
    seconds = round(time.perf_counter() - start, 3)
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
    return {"passed": False, "max_error": None, "cases": 0, "failed": 0, "seconds": seconds,
            "detail": f"the child process exited with code {done.returncode} before reporting: {tail}"}


def _write_atomically(path: pathlib.Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def format_table(record: dict) -> str:
    lines = [f"self-test on {record['card']} ({record['arch']}), lightllm {record['lightllm']}"
             f"{' @ ' + record['commit'] if record.get('commit') else ''}, torch {record['torch']}, "
             f"triton {record['triton'] or 'none'}", ""]
    header = f"{'op':28s} {'backend':8s} {'result':7s} {'cases':>6s} {'max rel err':>12s} {'seconds':>8s}  detail"
    lines += [header, "-" * len(header)]
    for op, results in sorted(record["ops"].items()):
        for backend, r in sorted(results.items()):
            err = "" if r.get("max_error") is None else f"{r['max_error']:.2e}"
            lines.append(f"{op:28s} {backend:8s} {'passed' if r['passed'] else 'FAILED':7s} {r['cases']:6d} "
                         f"{err:>12s} {r['seconds']:8.1f}  {r.get('detail', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The child entry point (``python -m lightllm.selftest --child OP BACKEND``)."""
    parser = argparse.ArgumentParser(prog="python -m lightllm.selftest",
                                     description="One (op, backend) self-test in this process; "
                                                 "use `python -m lightllm selftest` for the whole run.")
    parser.add_argument("--child", nargs=2, metavar=("OP", "BACKEND"), required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--import", dest="imports", action="append", default=[])
    args = parser.parse_args(argv)
    import lightllm  # noqa: F401  (registers the ops)
    # Run as ``-m`` this file is ``__main__``, a second copy of the module: plugins register their
    # sweeps with lightllm.selftest, so the child runs that one.
    from lightllm import selftest as registered

    for name in args.imports:
        __import__(name)
    op, backend = args.child
    try:
        result = registered._child(op, backend, args.device, args.small)
    except registered._Refusal as exc:
        result = {"passed": False, "max_error": None, "cases": 0, "failed": 0, "seconds": 0.0, "detail": str(exc)}
    except Exception as exc:  # a kernel raising on a valid input is a failure of that kernel, reported
        result = {"passed": False, "max_error": None, "cases": 0, "failed": 1, "seconds": 0.0,
                  "detail": f"{type(exc).__name__}: {exc}"}
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
