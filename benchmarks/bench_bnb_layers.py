#!/usr/bin/env python
"""Benchmark bitsandbytes-format layers on the CPU (or a GPU): lightllm's NF4 and LLM.int8 kernels
against bitsandbytes, torch's own int4 kernel and a dense float32 ``F.linear``, in one run.

With ``--device cuda`` the ``nf4-matmul`` section runs on the GPU: lightllm-triton and lightllm-cuda
(``matmul_4bit`` with those backends, float absmax, and ``-dq`` rows with the double-quantized
absmax decoded in the kernel), the reference, bnb-nf4 on the GPU, and the dense ``F.linear`` in
bfloat16 (cuBLAS, the denominator of every GPU speedup) and float32; x in bfloat16 and float16.
(The other sections stay CPU sections.)

Sections (rows of the CSV, column ``section``):

* ``nf4-matmul``: ``y = x W^T`` for a weight [N, K] at M rows of x.
  - lightllm-cpp: ``torch.ops.lightllm.matmul_4bit`` with the ``cpp`` backend (NF4, blocksize 64),
    x float32 and x bfloat16 (its vdpbf16ps kernel);
  - lightllm-torch: the reference (dequantizes the whole weight in PyTorch every call; M = 1 only
    unless ``--reference-all-m``);
  - f32-linear: ``F.linear`` on the dense float32 weight, the denominator of every speedup;
  - torch-int4: ``aten._weight_int4pack_mm_for_cpu`` (bf16 x, group 128, round-to-nearest codes of
    the same weight), the kernel torch's own int4 CPU path (torchao) runs;
  - bnb-nf4: ``bitsandbytes.matmul_4bit`` on bitsandbytes' own NF4 quantization (float32 and bf16 x).
* ``nf4-quantize``: NF4 quantization of the dense weight (blocksize 64), lightllm's
  ``functional.quantize_4bit`` (cpp op) against ``bitsandbytes.functional.quantize_4bit``.
* ``int8-linear``: LLM.int8 forward at thresholds 0 and 6 (x with three outlier feature columns):
  ``torch.ops.lightllm.int8_linear`` (cpp on the CPU; on a GPU ``lightllm-triton``, kernels/int8.py
  as the op runs it, and for M > 16 also ``lightllm-triton-dot``, its own tl.dot product instead
  of torch._int_mm, to place ``INT_MM_MIN_ROWS``), bitsandbytes' ``Linear8bitLt`` (eval,
  has_fp16_weights False), and a dense ``F.linear``: float32 on the CPU (f32-linear), float16 on a
  GPU (f16-linear, the denominator of the GPU speedups). On a GPU M defaults to 1 16 1024 4096.

Every output is checked before timing against float64 with the weight that implementation uses
(``max_rel_err`` = max|y - y64| / max|y64|), next to a dense ``F.linear`` in the row's dtype on that
same weight (``ref_rel_err``); the check fails above twice that (or one rounding of the dtype). For
int8 the float64 reference is LLM.int8's own pipeline (the same codes, an exact product).

Timing (benchmarks/_timing.py): wall time per call with the last-level cache flushed before each
call (median, p20-p80), eager time of back-to-back calls, achieved bandwidth over the bytes the op
must move (packed weight + absmax / scales, x, y), and that as a fraction of the copy bandwidth
measured in the same run (``copy_gbps``, bytes read + written).

Examples:
    python benchmarks/bench_bnb_layers.py --device cpu             # the full CPU run (~5 minutes, 2 cores)
    python benchmarks/bench_bnb_layers.py --device cpu --quick     # M 1 and 16, fewer iterations
    python benchmarks/bench_bnb_layers.py --device cpu --shapes 4096x4096 --m 1 --threads 1
    python benchmarks/bench_bnb_layers.py --device cuda --sections int8-linear   # Triton LLM.int8 vs fp16
    python benchmarks/bench_bnb_layers.py --device cuda --sections nf4-matmul --shapes 4096x11008 14336x4096 --m 1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    env_tags,
    format_table,
    measure_copy_bandwidth,
    positive_int,
    resolve_device,
    retain_freed_cpu_memory,
    setup_logging,
    size_pair,
    time_capped,
    warn_if_busy,
)

import lightllm  # noqa: E402
from lightllm import functional as LF  # noqa: E402
from lightllm.ops import fourbit as ops_fourbit  # noqa: E402
from lightllm.quantization.bnb import int8 as int8_format  # noqa: E402

logger = logging.getLogger("benchmarks.bnb_layers")

SHAPES = [(4096, 4096), (11008, 4096)]  # LLaMA-7B q/o and gate/up projections, N x K
MS = [1, 2, 4, 8, 16]
QUICK_MS = [1, 16]
GPU_INT8_MS = [1, 16, 1024, 4096]  # decode, a small batch, prefill
BLOCKSIZE = 64  # bitsandbytes' (and transformers') default
INT4_GROUP = 128
OUTLIER_COLUMNS = (3, 700, 2049)  # LLM.int8's systematic outlier features, 20x the typical value
THRESHOLDS = (0.0, 6.0)


@dataclass(frozen=True)
class Schedule:
    warmup: int
    iters: int
    eager_iters: int
    eager_repeats: int
    max_seconds: float


def schedule_for(quick: bool) -> Schedule:
    # The fast kernels take ~0.5 ms: many timed calls for a steady median; the slow baselines (the
    # reference, bitsandbytes' CPU paths: 10-700 ms) are capped by max_seconds.
    if quick:
        return Schedule(warmup=2, iters=15, eager_iters=5, eager_repeats=3, max_seconds=2.0)
    return Schedule(warmup=3, iters=41, eager_iters=10, eager_repeats=5, max_seconds=5.0)


class Skip(Exception):
    """An implementation cannot run here (the message says why)."""


def rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    scale = float(exact.abs().max()) or 1.0
    return float((y.double() - exact).abs().max()) / scale


def verdict(err: float, ref_err: float, dtype: torch.dtype) -> str:
    if not math.isfinite(err):
        return "FAIL: non-finite"
    return "ok" if err <= 2 * max(ref_err, torch.finfo(dtype).eps / 2) else "FAIL: > 2x dense"


# ---- the weights ------------------------------------------------------------------------------

class Weights:
    """One shape: a random float32 weight W [N, K] and its quantizations, built on demand."""

    def __init__(self, n: int, k: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.k = n, k
        self.w = torch.randn(n, k, generator=gen) / k ** 0.5
        self._cache: dict[str, object] = {}

    def get(self, key: str, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def nf4(self):
        """(packed bytes, float32 absmax, W as the 4-bit codes give it in float64)."""
        def build():
            with lightllm.use_backend("cpp" if lightllm.backends.has_kernel(ops_fourbit.QUANTIZE, "cpp", "cpu")
                                      else "torch"):
                packed, absmax = torch.ops.lightllm.quantize_4bit(self.w, BLOCKSIZE, "nf4")
            with lightllm.use_backend("torch"):
                w64 = torch.ops.lightllm.dequantize_4bit(packed, absmax, BLOCKSIZE, "nf4", self.n * self.k,
                                                         torch.float64).view(self.n, self.k)
            return packed, absmax, w64
        return self.get("nf4", build)

    def nf4_nested(self):
        """The double-quantized absmax of nf4() (uint8 codes + nested state, as quantize_4bit with
        compress_statistics=True makes it) and W in float64 as those codes give it."""
        def build():
            packed, absmax, _ = self.nf4()
            offset = absmax.mean()
            nested_code = LF.create_dynamic_map(signed=True)
            with lightllm.use_backend("torch"):
                codes, nested_absmax = LF.quantize_blockwise(absmax - offset, nested_code, 256)
            nested = (nested_absmax, nested_code, 256, offset.reshape(()))
            decoded = ops_fourbit.decode_nested_absmax(codes, *nested)
            with lightllm.use_backend("torch"):
                w64 = torch.ops.lightllm.dequantize_4bit(packed, decoded, BLOCKSIZE, "nf4", self.n * self.k,
                                                         torch.float64).view(self.n, self.k)
            return codes, nested, w64
        return self.get("nf4-nested", build)

    def int4(self):
        """torch's int4 pack of a round-to-nearest asymmetric quantization (group 128, bf16 scale and
        zero), and its weight in float64: W = (q - 8) * scale + zero per group."""
        def build():
            n, k = self.n, self.k
            if k % INT4_GROUP or n % 8:
                raise Skip(f"torch-int4 needs K a multiple of {INT4_GROUP} and N of 8, got {n}x{k}")
            convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
            mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
            if convert is None or mm is None:
                raise Skip(f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu")
            g = self.w.view(n, k // INT4_GROUP, INT4_GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
            zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # the value of code 8
            q = ((g - zero.float()) / scale.float() + 8).round().clamp(0, 15)
            w64 = ((q.double() - 8) * scale.double() + zero.double()).view(n, k)
            scales_and_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous()
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = convert(q.view(n, k).to(torch.int32).contiguous(), inner_k_tiles)
            return packed, scales_and_zeros, mm, w64
        return self.get("int4", build)

    def int8(self):
        """(CB, SCB) as Linear8bitLt stores the float16 weight, and the dequantized weight."""
        def build():
            cb, scb, _ = int8_format.int8_vectorwise_quant(self.w.half())
            return cb, scb
        return self.get("int8", build)


def activations(m: int, k: int, seed: int, outliers: bool = False) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    if outliers:
        for col in OUTLIER_COLUMNS:
            if col < k:
                x[:, col] = 20.0 * torch.sign(x[:, col])
    return x


# ---- cases --------------------------------------------------------------------------------------

@dataclass
class Case:
    section: str
    impl: str
    dtype: torch.dtype
    call: Callable[[], torch.Tensor]
    nbytes: int  # what the op must move
    check: Callable[[torch.Tensor], tuple[float, float, str]] | None = None  # (err, ref_err, verdict)
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    threshold: float | None = None


def matmul_check(x: torch.Tensor, w64: torch.Tensor, dtype: torch.dtype):
    """Checked on the CPU (x and w64 CPU tensors; y may be on the GPU)."""
    x = x.cpu()
    exact = x.double() @ w64.t()
    dense_err = rel_err(F.linear(x.to(dtype), w64.to(dtype)), exact)

    def check(y):
        err = rel_err(y.cpu(), exact)
        return err, dense_err, verdict(err, dense_err, dtype)
    return check


def nf4_gpu_cases(wt: Weights, m: int, args, bnb, device: torch.device) -> list[Case]:
    """nf4-matmul on a GPU: lightllm's triton and cuda backends (float and double-quantized absmax),
    the reference at M = 1, bnb-nf4, and dense F.linear in bfloat16 (cuBLAS) and float32."""
    n, k = wt.n, wt.k
    packed, absmax, w64 = wt.nf4()
    codes, nested, w64_dq = wt.nf4_nested()
    packed_d, absmax_d, codes_d = packed.to(device), absmax.to(device), codes.to(device)
    nested_d = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in nested)
    x32 = activations(m, k, seed=m)
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        x = x32.to(dtype)
        xd = x.to(device)
        io = 2 * x.element_size() * (m * k + m * n)
        for backend in ("triton", "cuda"):
            if not lightllm.backends.has_kernel(ops_fourbit.MATMUL, backend, device.type):
                logger.warning("no lightllm-%s rows: %s", backend,
                               lightllm.backends.why_unavailable(backend) or "no kernel for this device")
                continue
            cases.append(Case("nf4-matmul", f"lightllm-{backend}", dtype,
                              lambda xd=xd: torch.ops.lightllm.matmul_4bit(xd, packed_d, absmax_d, BLOCKSIZE, "nf4", n,
                                                                           None),
                              packed.nbytes + absmax.nbytes + io, matmul_check(x, w64, dtype),
                              lambda backend=backend: lightllm.use_backend(backend)))
            cases.append(Case("nf4-matmul", f"lightllm-{backend}-dq", dtype,
                              lambda xd=xd: torch.ops.lightllm.matmul_4bit(xd, packed_d, codes_d, BLOCKSIZE, "nf4", n,
                                                                           None, *nested_d),
                              packed.nbytes + codes.nbytes + nested[0].nbytes + io, matmul_check(x, w64_dq, dtype),
                              lambda backend=backend: lightllm.use_backend(backend)))
        if m == 1 or args.reference_all_m:
            cases.append(Case("nf4-matmul", "lightllm-torch", dtype,
                              lambda xd=xd: torch.ops.lightllm.matmul_4bit(xd, packed_d, absmax_d, BLOCKSIZE, "nf4", n,
                                                                           None),
                              packed.nbytes + absmax.nbytes + io, matmul_check(x, w64, dtype),
                              lambda: lightllm.use_backend("torch")))
        if bnb is not None:
            def bnb_weight():
                w4, state = bnb.functional.quantize_4bit(wt.w.to(device), blocksize=BLOCKSIZE, quant_type="nf4")
                with lightllm.use_backend("torch"):
                    bnb_w64 = torch.ops.lightllm.dequantize_4bit(w4.view(-1).cpu(), state.absmax.cpu(), BLOCKSIZE,
                                                                 "nf4", n * k, torch.float64).view(n, k)
                return w4, state, bnb_w64
            w4, state, bnb_w64 = wt.get("bnb-nf4-gpu", bnb_weight)
            cases.append(Case("nf4-matmul", "bnb-nf4", dtype,
                              lambda xd=xd: bnb.matmul_4bit(xd, w4.t(), quant_state=state),
                              w4.nbytes + state.absmax.nbytes + io, matmul_check(x, bnb_w64, dtype)))
        w16 = wt.get(f"dense-{dtype}", lambda dtype=dtype: wt.w.to(device, dtype))
        cases.append(Case("nf4-matmul", f"{str(dtype)[6:]}-linear", dtype, lambda xd=xd, w16=w16: F.linear(xd, w16),
                          w16.nbytes + io, matmul_check(x, wt.w.to(dtype).double(), dtype)))
    w32 = wt.get("dense-f32", lambda: wt.w.to(device))
    x32d = x32.to(device)
    cases.append(Case("nf4-matmul", "f32-linear", torch.float32, lambda: F.linear(x32d, w32),
                      w32.nbytes + 4 * (m * k + m * n), matmul_check(x32, wt.w.double(), torch.float32)))
    return cases


def nf4_cases(wt: Weights, m: int, args, bnb) -> list[Case]:
    n, k = wt.n, wt.k
    packed, absmax, w64 = wt.nf4()
    x32 = activations(m, k, seed=m)
    nf4_bytes = packed.nbytes + absmax.nbytes
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        io = m * k * x.element_size() + m * n * x.element_size()
        if lightllm.backends.has_kernel(ops_fourbit.MATMUL, "cpp", "cpu"):
            cases.append(Case("nf4-matmul", "lightllm-cpp", dtype,
                              lambda x=x: torch.ops.lightllm.matmul_4bit(x, packed, absmax, BLOCKSIZE, "nf4", n, None),
                              nf4_bytes + io, matmul_check(x, w64, dtype), lambda: lightllm.use_backend("cpp")))
        if dtype == torch.float32 and (m == 1 or args.reference_all_m):
            cases.append(Case("nf4-matmul", "lightllm-torch", dtype,
                              lambda x=x: torch.ops.lightllm.matmul_4bit(x, packed, absmax, BLOCKSIZE, "nf4", n, None),
                              nf4_bytes + io, matmul_check(x, w64, dtype), lambda: lightllm.use_backend("torch")))
        if bnb is not None:
            bnb_nf4 = wt.get("bnb-nf4", lambda: bnb.functional.quantize_4bit(wt.w, blocksize=BLOCKSIZE, quant_type="nf4"))
            w4, state = bnb_nf4
            with lightllm.use_backend("torch"):  # bitsandbytes' CPU dequantize is wrong on some layouts
                bnb_w64 = torch.ops.lightllm.dequantize_4bit(w4.view(-1), state.absmax, BLOCKSIZE, "nf4", n * k,
                                                             torch.float64).view(n, k)
            cases.append(Case("nf4-matmul", "bnb-nf4", dtype, lambda x=x: bnb.matmul_4bit(x, w4.t(), quant_state=state),
                              w4.nbytes + state.absmax.nbytes + io, matmul_check(x, bnb_w64, dtype)))
    x = x32
    cases.append(Case("nf4-matmul", "f32-linear", torch.float32, lambda: F.linear(x, wt.w),
                      wt.w.nbytes + 2 * m * k * 4 + m * n * 4, matmul_check(x, wt.w.double(), torch.float32)))
    try:
        ipacked, sz, mm, iw64 = wt.int4()
        xb = x32.to(torch.bfloat16)
        cases.append(Case("nf4-matmul", "torch-int4", torch.bfloat16, lambda: mm(xb, ipacked, INT4_GROUP, sz),
                          ipacked.nbytes + sz.nbytes + 2 * (m * k + m * n), matmul_check(xb, iw64, torch.bfloat16)))
    except Skip as exc:
        logger.warning("no torch-int4 rows: %s", exc)
    return cases


def int8_cases(wt: Weights, m: int, threshold: float, bnb, device: torch.device = torch.device("cpu")) -> list[Case]:
    n, k = wt.n, wt.k
    cb, scb = wt.get(f"int8-{device}", lambda: tuple(t.to(device) for t in wt.int8()))
    x = activations(m, k, seed=100 + m, outliers=True).half().to(device)
    with lightllm.use_backend("torch"):
        ref = torch.ops.lightllm.int8_linear(x, cb, scb, None, threshold)
    # LLM.int8's pipeline in float64: the reference's codes, an exact product, the outlier columns in 16 bits
    ca, sca, cols = int8_format.int8_vectorwise_quant(x, threshold)
    exact = (ca.double() @ cb.double().t()) * (sca.double()[:, None] * scb.double()[None, :]) / 127 ** 2
    if cols is not None and cols.numel():
        exact += x[:, cols].double() @ int8_format.int8_vectorwise_dequant(cb[:, cols], scb).half().double().t()
    ref_err = rel_err(ref, exact)

    def check(y):
        err = rel_err(y, exact)
        return err, ref_err, verdict(err, ref_err, torch.float16)

    io = 2 * (m * k + m * n)

    def op():
        return torch.ops.lightllm.int8_linear(x, cb, scb, None, threshold)

    cases = []
    if device.type == "cpu":
        cases.append(Case("int8-linear", "lightllm-cpp", torch.float16, op, cb.nbytes + scb.nbytes + io, check,
                          lambda: lightllm.use_backend("cpp"), threshold))
    elif lightllm.backends.has_kernel("int8_linear", "triton", device.type):
        cases.append(Case("int8-linear", "lightllm-triton", torch.float16, op, cb.nbytes + scb.nbytes + io, check,
                          lambda: lightllm.use_backend("triton"), threshold))
        if m > 16:  # the kernel's own int8 tl.dot where the op would take torch._int_mm's product
            cases.append(Case("int8-linear", "lightllm-triton-dot", torch.float16, op, cb.nbytes + scb.nbytes + io,
                              check, _triton_int8_dot_only, threshold))
    if bnb is not None:
        layer = wt.get(f"bnb-int8-{threshold}-{device}", lambda: _bnb_int8_layer(bnb, wt, threshold, device))
        cases.append(Case("int8-linear", "bnb-Linear8bitLt", torch.float16, lambda: layer(x),
                          cb.nbytes + scb.nbytes + io, check, torch.no_grad, threshold))
    dense_dtype = torch.float32 if device.type == "cpu" else torch.float16
    xd = x.to(dense_dtype)
    wd = wt.get(f"dense-{dense_dtype}-{device}", lambda: wt.w.to(device=device, dtype=dense_dtype))
    dense_exact = xd.double() @ wd.double().t()
    size = wd.element_size()
    cases.append(Case("int8-linear", "f32-linear" if dense_dtype == torch.float32 else "f16-linear", dense_dtype,
                      lambda: F.linear(xd, wd), wd.nbytes + size * (m * k + m * n),
                      lambda y: (rel_err(y, dense_exact), rel_err(y, dense_exact), "ok"), threshold=threshold))
    return cases


@contextlib.contextmanager
def _triton_int8_dot_only():
    """The triton backend with its own int8 tl.dot product at every M (no torch._int_mm)."""
    from lightllm.kernels import int8 as triton_int8

    saved = triton_int8.use_int_mm
    triton_int8.use_int_mm = lambda m, n, k, device: False
    try:
        with lightllm.use_backend("triton"):
            yield
    finally:
        triton_int8.use_int_mm = saved


def _bnb_int8_layer(bnb, wt: Weights, threshold: float, device: torch.device = torch.device("cpu")):
    layer = bnb.nn.Linear8bitLt(wt.k, wt.n, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict({"weight": wt.w.half()}, strict=False)
    layer = layer.to(device).eval()  # quantizes on the move
    cb, _ = wt.int8()
    if not torch.equal(layer.weight.data.cpu(), cb):
        logger.warning("bitsandbytes' int8 weight differs from ours; its row checks against our codes")
    return layer


def quantize_cases(wt: Weights, dtype: torch.dtype, bnb) -> list[Case]:
    w = wt.w.to(dtype)
    nbytes = w.nbytes + w.numel() // 2 + 4 * (w.numel() // BLOCKSIZE)
    with lightllm.use_backend("torch"):
        ref_packed, ref_absmax = torch.ops.lightllm.quantize_4bit(w, BLOCKSIZE, "nf4")

    def check_same(out):  # (packed [n / 2, 1], QuantState) from either library
        same = torch.equal(out[0].reshape(-1).view(torch.uint8), ref_packed) and torch.equal(out[1].absmax, ref_absmax)
        return 0.0, 0.0, "ok" if same else "FAIL: codes differ from the reference"

    cases = [Case("nf4-quantize", "lightllm-cpp", dtype, lambda: LF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"),
                  nbytes, check_same, lambda: lightllm.use_backend("cpp"))]
    if bnb is not None:
        cases.append(Case("nf4-quantize", "bnb", dtype,
                          lambda: bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"), nbytes,
                          check_same))
    return cases


# ---- running --------------------------------------------------------------------------------------

def run_case(case: Case, sched: Schedule, device: torch.device, copy_bw: float, base: dict) -> dict | None:
    try:
        with case.scope(), torch.no_grad():
            out = case.call()
            err, ref_err, check = case.check(out) if case.check else (None, None, "")
            del out
            timing = time_capped(case.call, warmup=sched.warmup, iters=sched.iters, eager_iters=sched.eager_iters,
                                 eager_repeats=sched.eager_repeats, max_seconds=sched.max_seconds, device=device)
    except Exception as exc:  # a baseline that cannot run this case: no row, a warning
        logger.warning("%s %s %s failed, no row: %s: %s", case.section, case.impl, case.dtype, type(exc).__name__, exc)
        return None
    row = {**base, "section": case.section, "impl": case.impl, "dtype": str(case.dtype).removeprefix("torch."),
           "threshold": "" if case.threshold is None else case.threshold, **timing, "bytes": case.nbytes,
           "gbps": case.nbytes / (timing["device_us"] * 1e-6) / 1e9, "max_rel_err": err, "ref_rel_err": ref_err,
           "check": check}
    row["pct_copy"] = 100 * row["gbps"] * 1e9 / copy_bw
    (logger.warning if check not in ("", "ok") else logger.info)(
        "%-12s %-9s M=%-3s %-16s %-8s thr=%-4s %10.1f us  %s", case.section, base["shape"], base.get("m", "-"),
        case.impl, row["dtype"], row["threshold"], row["device_us"], check)
    return row


def add_speedups(rows: list[dict]) -> None:
    """Speedup over the dense F.linear in the same section, shape, M (and threshold): on a GPU
    cuBLAS's bf16 (nf4-matmul) or fp16 (int8-linear) F.linear, on the CPU float32; quantize: over bnb."""
    for r in rows:
        if r["section"] == "nf4-quantize":
            base = [b for b in rows if b["section"] == r["section"] and b["shape"] == r["shape"]
                    and b["dtype"] == r["dtype"] and b["impl"] == "bnb"]
        else:
            same = [b for b in rows if b["section"] == r["section"] and b["shape"] == r["shape"] and b["m"] == r["m"]
                    and b["threshold"] == r["threshold"]]
            base = next(([b for b in same if b["impl"] == impl] for impl in ("bfloat16-linear", "f16-linear",
                                                                              "f32-linear")
                         if any(b["impl"] == impl for b in same)), [])
        r["speedup"] = base[0]["device_us"] / r["device_us"] if base else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time lightllm's NF4 (matmul_4bit, quantize_4bit) and LLM.int8 (int8_linear) kernels against "
                    "bitsandbytes, torch's int4 CPU kernel and a dense float32 F.linear, after checking every output "
                    "against float64.",
        epilog="Shapes are N x K (out x in features, the weight is [N, K]), M the rows of x. Default shapes "
               + " ".join(f"{n}x{k}" for n, k in SHAPES) + ", M " + " ".join(map(str, MS))
               + ". Speedups: over f32-linear at the same shape and M (matmul, int8), over bitsandbytes (quantize). "
               "Rows are appended to the CSV, tagged with machine, date, commit and torch version.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where to run (default cpu: the C++ kernels are CPU kernels; cuda runs nf4-matmul and "
                        "int8-linear on the GPU: lightllm's triton (and cuda) backends, the references, bitsandbytes' "
                        "CUDA paths and cuBLAS F.linear)")
    p.add_argument("--quick", action="store_true", help="M " + " ".join(map(str, QUICK_MS))
                   + ", fewer iterations, float32 quantize only")
    p.add_argument("--shapes", type=size_pair, nargs="+", default=None, metavar="NxK",
                   help="weight shapes N x K, e.g. 4096x4096 11008x4096")
    p.add_argument("--m", type=positive_int, nargs="+", default=None, metavar="M", help="rows of x, e.g. 1 4 16")
    p.add_argument("--sections", nargs="+", choices=("nf4-matmul", "nf4-quantize", "int8-linear"),
                   default=("nf4-matmul", "nf4-quantize", "int8-linear"), help="what to time (default: all)")
    p.add_argument("--reference-all-m", action="store_true",
                   help="time the reference matmul at every M (default M = 1: it dequantizes the whole weight each call)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per case (overrides the schedule)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_bnb_layers.csv",
                   help="CSV to append to (default benchmarks/results/bench_bnb_layers.csv)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


COLUMNS = [("section", "section"), ("shape", "N x K"), ("m", "M"), ("impl", "impl"), ("dtype", "dtype"),
           ("threshold", "thr"), ("device_us", "median us"), ("p20_p80", "p20-p80 us"), ("eager_us", "eager us"),
           ("gbps", "GB/s"), ("pct_copy", "% copy"), ("speedup", "speedup"), ("max_rel_err", "rel err"),
           ("ref_rel_err", "dense err"), ("check", "check")]


def _import_bnb(skip: bool):
    if skip:
        return None
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
        return bitsandbytes
    except Exception as exc:  # ImportError, or a broken install failing at import time
        logger.warning("no bitsandbytes rows: it is not importable (%s: %s)", type(exc).__name__, exc)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    if device.type != "cpu":
        logger.warning("on %s the nf4-matmul and int8-linear sections run on the GPU; nf4-quantize times the "
                       "reference and bitsandbytes only", device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sched = schedule_for(args.quick)
    if args.iters is not None:
        sched = Schedule(warmup=min(sched.warmup, args.iters), iters=args.iters, eager_iters=min(sched.eager_iters, args.iters),
                         eager_repeats=min(sched.eager_repeats, args.iters), max_seconds=sched.max_seconds)
    shapes = args.shapes or SHAPES
    ms = sorted(dict.fromkeys(args.m or (QUICK_MS if args.quick else MS)))
    int8_ms = ms if args.m or device.type == "cpu" else GPU_INT8_MS
    malloc = "retain" if device.type == "cpu" and retain_freed_cpu_memory() else "default"
    tags = env_tags(device)
    busy = warn_if_busy(device)
    bnb = _import_bnb(args.no_bnb)
    copy_bw = measure_copy_bandwidth(device, 1 << 28, iters=5)
    logger.info("%s, %d torch threads, copy bandwidth %.1f GB/s (read + write), commit %s", tags["card"],
                torch.get_num_threads(), copy_bw / 1e9, tags["commit"])
    extra = {"copy_gbps": round(copy_bw / 1e9, 2), "threads": torch.get_num_threads(), "malloc": malloc,
             "others_busy": "" if busy is None else round(busy, 2),
             "bitsandbytes": getattr(bnb, "__version__", "none"), "isa": _isa()}
    rows = []
    for n, k in shapes:
        wt = Weights(n, k, args.seed)
        base = {"shape": f"{n}x{k}", "n": n, "k": k}
        if "nf4-quantize" in args.sections:
            for dtype in (torch.float32,) if args.quick else (torch.float32, torch.bfloat16):
                for case in quantize_cases(wt, dtype, bnb):
                    row = run_case(case, sched, device, copy_bw, {**base, "m": ""})
                    rows += [row] if row else []
        for m in sorted(set(ms) | set(int8_ms)):
            if "nf4-matmul" in args.sections and m in ms:
                cases = nf4_gpu_cases(wt, m, args, bnb, device) if device.type == "cuda" else nf4_cases(wt, m, args, bnb)
                for case in cases:
                    row = run_case(case, sched, device, copy_bw, {**base, "m": m})
                    rows += [row] if row else []
            if "int8-linear" in args.sections and m in int8_ms:
                for threshold in THRESHOLDS:
                    for case in int8_cases(wt, m, threshold, bnb, device):
                        row = run_case(case, sched, device, copy_bw, {**base, "m": m})
                        rows += [row] if row else []
        del wt
    add_speedups(rows)
    for r in rows:
        r["p20_p80"] = f"{r['device_us_p20']:.4g}-{r['device_us_p80']:.4g}"
        r.update(extra)
    CsvWriter(args.out, tags).write(rows)
    print(f"{tags['card']}, torch {tags['torch']}, {torch.get_num_threads()} threads, commit {tags['commit']}, "
          f"{tags['date']}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; kernels: {extra['isa']}")
    print(format_table(rows, COLUMNS))
    print(f"rows appended to {args.out}")
    failed = [r for r in rows if r["check"] not in ("", "ok")]
    if failed:
        print(f"{len(failed)} rows failed their check: " + ", ".join(f"{r['impl']} {r['shape']} M={r['m']}"
                                                                    for r in failed))
    return 0


def _isa() -> str:
    from lightllm import _native

    module = _native.cpp_module()
    return module.bnb_cpu_isa() if module is not None and hasattr(module, "bnb_cpu_isa") else "no lightllm._C"


if __name__ == "__main__":
    sys.exit(main())
