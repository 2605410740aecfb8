#!/usr/bin/env python
"""Benchmark weight-only low-bit matmul ``y = x W^T``: lightllm's GPTQ layers against baselines.

For every weight shape (N out x K in), every M (rows of x) and every bit width, each lightllm
backend that implements ``gptq_matmul`` on the device ("cuda", "triton", the reference "torch")
runs a ``QuantLinear`` built by round-to-nearest from a random ``nn.Linear`` (group size 128 by
default; RTN is as good as GPTQ for timing). In the same run, on the same shapes and M:

* cublas-fp16, cublas-bf16: ``F.linear`` on the dense (dequantized 4-bit) weight; cublas-fp16 is
  the denominator of every speedup. On the CPU these rows are torch's CPU ``F.linear``.
* dense-fp32 (the CPU's baseline): ``F.linear`` in float32 on the same dense weight; on the CPU the
  speedups (table, plot) are over it, the number the CPU targets are stated in.
* torch-int4: torch's own W4 kernel (``aten._weight_int4pack_mm``, "tinygemm", bf16) on the same
  4-bit codes, converted to its layout.
* bnb-nf4: bitsandbytes ``matmul_4bit`` on its own NF4 quantization of the layer (blocksize 64).

Before timing, every output is checked against a float64 matmul with the same weight that
implementation multiplies by (for ours ``QuantLinear.dequantize(torch.float64)``): the row records
the max relative error, ``max|y - y64| / max|y64|``, next to cuBLAS's error in the same dtype on
that same weight, and fails ("FAIL") when it is more than twice that (the issue's accuracy bar).

Each row gives device time (CUDA events, or CPU wall time, caches flushed before each call; median
and 20th/80th percentiles), eager time per back-to-back call, the speedup over cublas-fp16 at the
same shape and M, and the achieved bandwidth counting the bytes the op must move (packed weight,
scales and zeros for the quantized kernels, the dense weight for cuBLAS; plus x and y), also as a
fraction of the copy bandwidth measured in the same run.

Examples:
    python benchmarks/bench_quant_matmul.py --quick              # 2 shapes, 4 M, ~2 min on an H100
    python benchmarks/bench_quant_matmul.py                      # the full sweep on the GPU
    python benchmarks/bench_quant_matmul.py --shapes 8192x8192 --m 1 16 --bits 4 3
    python benchmarks/bench_quant_matmul.py --device cpu         # the CPU run: C++ GEMV, 2/3/4/8 bits,
                                                                 # fp16 and bf16, M 1-16, 7B shapes (~3 min)
    python benchmarks/bench_quant_matmul.py --device cpu --shapes 256x256 --m 1   # smoke run
    TRITON_INTERPRET=1 python benchmarks/bench_quant_matmul.py --device cpu --shapes 256x256 --m 1  # + Triton

Writes rows to benchmarks/results/bench_quant_matmul.csv (appending; every row tagged with card,
date, commit), a plot of speedup over cublas-fp16 against M next to it (same name, .png), and
prints a table to stdout. End-to-end model timing is not part of this script.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    env_tags,
    fmt_float,
    format_table,
    measure_copy_bandwidth,
    positive_int,
    resolve_device,
    save_figure,
    retain_freed_cpu_memory,
    setup_logging,
    size_pair,
    time_capped,
    warn_if_busy,
)

import lightllm  # noqa: E402
from lightllm.backends import BACKENDS, why_unavailable  # noqa: E402
from lightllm.nn.quant_linear import QuantLinear  # noqa: E402
from lightllm.ops import gptq as ops_gptq  # noqa: E402
from lightllm.quantization.gptq.format import GPTQ_BITS, default_g_idx, unpack_gptq, values_per_chunk  # noqa: E402

logger = logging.getLogger("benchmarks.quant_matmul")

OURS = "lightllm-"  # + backend name
CUBLAS_FP16 = "cublas-fp16"
CUBLAS_BF16 = "cublas-bf16"
TORCH_INT4 = "torch-int4"
BNB_NF4 = "bnb-nf4"
DENSE_FP32 = "dense-fp32"
BASELINES = (CUBLAS_FP16, CUBLAS_BF16, DENSE_FP32, TORCH_INT4, BNB_NF4)
IMPL_CHOICES = tuple(OURS + b for b in BACKENDS) + BASELINES
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# LLaMA linears, (N out, K in): q/o 7B, gate/up 7B, down 7B, q/o 70B, gate/up 70B.
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
GPU_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
QUICK_M = [1, 16, 64, 1024]
# The CPU run: LLaMA-7B's q/o and gate/up shapes at decode sizes (the C++ GEMV's range). The
# reference dequantizes the whole weight per call (hundreds of ms): by default it runs once per shape
# (4 bits, the smallest M), as the "before" number.
CPU_SHAPES = [(4096, 4096), (11008, 4096)]
CPU_M = [1, 2, 4, 8, 16]
CPU_QUICK_M = [1, 16]


# ---- run settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Iteration counts, and a time cap per measurement: the reference backend dequantizes the
    whole weight in PyTorch on every call (tens of ms at 28672 x 8192), which at the fast kernels'
    iteration counts would dominate the run. Counts are lowered, never below 3, to fit the cap."""

    warmup: int
    iters: int  # timed calls for the device time
    eager_iters: int  # back-to-back calls per eager repeat
    eager_repeats: int
    copy_bytes: int
    max_seconds: float  # per case, device and eager timing together; 0 = no cap


def schedule_for(device: torch.device, quick: bool) -> Schedule:
    if device.type == "cuda":
        if quick:
            return Schedule(warmup=3, iters=20, eager_iters=10, eager_repeats=3, copy_bytes=1 << 30, max_seconds=1.0)
        return Schedule(warmup=5, iters=50, eager_iters=20, eager_repeats=5, copy_bytes=1 << 30, max_seconds=3.0)
    # 256 MB per copy buffer is far beyond the last-level cache and spares the RAM.
    if quick:
        return Schedule(warmup=1, iters=3, eager_iters=1, eager_repeats=3, copy_bytes=1 << 28, max_seconds=3.0)
    # The C++ GEMV takes well under a millisecond: enough timed calls for a steady median on a 2-core
    # machine that other jobs share (the cap keeps the slow rows short).
    return Schedule(warmup=2, iters=30, eager_iters=10, eager_repeats=3, copy_bytes=1 << 28, max_seconds=6.0)


def bits_plan(bits_arg: list[int] | None, ms: list[int], device: torch.device) -> dict[int, list[int]]:
    """Which M each bit width of ours runs at: by default on a GPU the 4-bit sweep and 3 bits at M = 1
    (or the smallest M asked for), on the CPU every width at every M; with --bits, every listed width
    at every M."""
    if bits_arg is None:
        if device.type == "cpu":
            return {b: list(ms) for b in (4, 3, 2, 8)}
        return {4: list(ms), 3: [1 if 1 in ms else min(ms)]}
    return {b: list(ms) for b in dict.fromkeys(bits_arg)}


# ---- the layer under test -------------------------------------------------------------------

class Layer:
    """One weight shape: a random fp16 ``nn.Linear`` and its GPTQ quantizations, built on demand."""

    def __init__(self, n: int, k: int, group_size: int, sym: bool, device: torch.device, seed: int):
        self.n, self.k, self.group_size, self.sym, self.device = n, k, group_size, sym, device
        torch.manual_seed(seed)  # nn.Linear's initialization draws from the global generator
        self.linear = nn.Linear(k, n, bias=False, dtype=torch.float16, device=device)
        self._quant: dict[int, QuantLinear] = {}
        self._dequant64: dict[int, torch.Tensor] = {}

    def quant(self, bits: int) -> QuantLinear:
        if bits not in self._quant:
            with torch.no_grad():
                self._quant[bits] = QuantLinear.from_linear(self.linear, bits, self.group_size, sym=self.sym)
        return self._quant[bits]

    def quant_act_order(self, bits: int) -> QuantLinear:
        """The same codes with a random act-order g_idx (each group's columns scattered over K): the
        module permutes them once at load, so the kernel sees contiguous groups plus an x gather."""
        key = -bits
        if key not in self._quant:
            state = self.quant(bits).state_dict()
            gs = self.k if self.group_size == -1 else self.group_size
            order = torch.randperm(self.k, generator=torch.Generator().manual_seed(self.k + bits))
            state["g_idx"] = (torch.argsort(order) // gs).to(torch.int32).to(self.device)
            module = QuantLinear(self.k, self.n, bits, self.group_size, bias=False, device=self.device)
            module.load_state_dict(state)
            self._quant[key] = module
            with lightllm.use_backend("torch"), torch.no_grad():
                self._dequant64[key] = module.dequantize(torch.float64)
        return self._quant[key]

    def dequantized64(self, bits: int) -> torch.Tensor:
        """The quantized weight [N, K] in float64, what every GPTQ backend multiplies by."""
        if bits not in self._dequant64:
            # The accuracy reference comes from the reference backend whatever backend an outer
            # use_backend() or LIGHTLLM_BACKEND names.
            with lightllm.use_backend("torch"), torch.no_grad():
                self._dequant64[bits] = self.quant(bits).dequantize(torch.float64)
        return self._dequant64[bits]


# ---- implementations ------------------------------------------------------------------------

class Skip(Exception):
    """An implementation cannot run this case; the message says why (logged, no row)."""


@dataclass
class Prepared:
    """One implementation set up for one weight. ``call(x)`` computes ``x W^T``; ``weight64`` is W
    as the implementation sees it, in float64 (the accuracy reference); ``weight_bytes`` is what
    the op must read of the weight (codes, scales, zeros)."""

    call: Callable[[torch.Tensor], torch.Tensor]
    weight64: torch.Tensor
    weight_bytes: int
    group_size: int | None = None


@dataclass
class Impl:
    """``prepare(layer, bits)`` builds the weight; ``scope()`` wraps every call (selects the lightllm
    backend) and is entered once around a whole measurement, so that its own cost is not timed.
    ``bits`` is None for ours (they follow the run's bit plan), else the baseline's fixed width."""

    name: str
    backend: str  # the lightllm backend, or the library / op behind a baseline
    dtype: torch.dtype
    bits: int | None
    prepare: Callable[[Layer, int], Prepared]
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _ours(backend: str, dtype: torch.dtype, act_order: bool = False) -> Impl:
    def prepare(layer: Layer, bits: int) -> Prepared:
        module = layer.quant_act_order(bits) if act_order else layer.quant(bits)
        # Bytes the kernel needs: codes, scales, zeros. g_idx (4 bytes per input column) is left out:
        # with sequential groups a kernel can compute the group from k, as tinygemm and bnb do.
        nbytes = module.qweight.nbytes + module.scales.nbytes + module.qzeros.nbytes
        weight64 = layer._dequant64[-bits] if act_order else layer.dequantized64(bits)
        return Prepared(module, weight64, nbytes, layer.group_size)

    name = OURS + backend + ("+act-order" if act_order else "")
    return Impl(name, backend, dtype, None, prepare, lambda: lightllm.use_backend(backend))


def _cublas(dtype: torch.dtype) -> Impl:
    def prepare(layer: Layer, bits: int) -> Prepared:
        # The dense weight is the dequantized 4-bit one: the same weight the accuracy bar uses.
        w64 = layer.dequantized64(4)
        weight = w64.to(dtype).contiguous()
        return Prepared(lambda x: F.linear(x, weight), w64, weight.nbytes)

    name = {torch.float16: CUBLAS_FP16, torch.bfloat16: CUBLAS_BF16, torch.float32: DENSE_FP32}[dtype]
    return Impl(name, "aten F.linear", dtype, torch.finfo(dtype).bits, prepare)


def _int4pack_ops(device: torch.device):
    """(convert, mm, op names) of torch's tinygemm W4 kernel for ``device``, or a reason string.

    torch >= 2.5 (what lightllm requires): on CUDA ``_convert_weight_to_int4pack`` takes the codes as
    uint8 [N, K/2] (two per byte, even k in the high nibble) and returns an opaque int32 tile
    layout; the CPU has separate ``*_for_cpu`` ops whose packing takes int32 codes [N, K]. Both mm
    ops are ``(x [M, K], packed, group_size, scales_and_zeros [K/gs, N, 2]) -> [M, N]`` and compute
    ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``. Older torch took other layouts.
    """
    suffix = "_for_cpu" if device.type == "cpu" else ""
    names = (f"_convert_weight_to_int4pack{suffix}", f"_weight_int4pack_mm{suffix}")
    ops = [getattr(torch.ops.aten, name, None) for name in names]
    if any(op is None for op in ops):
        return f"torch {torch.__version__} has no aten.{' / aten.'.join(names)}"
    for name, op in zip(names, ops):
        logger.debug("torch int4: %s", op.default._schema)
    return ops[0], ops[1], names


def _torch_int4(device: torch.device) -> Impl | None:
    found = _int4pack_ops(device)
    if isinstance(found, str):
        logger.warning("skipping %s: %s", TORCH_INT4, found)
        return None
    convert, mm, names = found

    def prepare(layer: Layer, bits: int) -> Prepared:
        gs, (n, k) = layer.group_size, (layer.n, layer.k)
        if gs not in (32, 64, 128, 256):
            raise Skip(f"tinygemm supports group sizes 32, 64, 128, 256, not {gs}")
        # The packed tiles hold inner_k_tiles x 16 values of K; 8 is what torchao uses.
        inner_k_tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if inner_k_tiles is None or n % 8 or k % gs:
            raise Skip(f"tinygemm needs N % 8 == 0 and K a multiple of 32 and of the group size; got {n}x{k}")
        module = layer.quant(4)
        if not torch.equal(module.g_idx.cpu(), default_g_idx(k, gs)):
            raise Skip("tinygemm needs sequential groups (no act-order)")
        t = unpack_gptq(module.qweight, module.qzeros, module.scales, module.g_idx, 4, module.checkpoint_format)
        q, z, s = t["q"].t().contiguous(), t["zeros"].float(), t["scales"].float()  # q [N, K], z and s [G, N]
        # GPTQ: W = s (q - z) = s (q - 8) + s (8 - z); tinygemm adds its zero after scaling (q - 8).
        # Its scale and zero are bf16, so its weight differs from ours by bf16 rounding of the scales.
        scale = s.to(torch.bfloat16)
        zero = (s * (8 - z)).to(torch.bfloat16)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).contiguous()  # [G, N, 2]
        if device.type == "cuda":
            codes = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # [N, K/2], even k high
        else:
            codes = q.to(torch.int32)
        packed = convert(codes, inner_k_tiles)

        g = torch.arange(k, device=q.device) // gs
        w64 = (q.double() - 8) * scale.double()[g].t() + zero.double()[g].t()  # [N, K]
        ours64 = layer.dequantized64(4)
        drift = float((w64 - ours64).abs().max() / ours64.abs().max())
        # bf16 scales are within 2**-9 of the fp16 ones; a wrong conversion would be far off.
        (logger.warning if drift > 1e-2 else logger.debug)(
            "%s %dx%d: its weight differs from the GPTQ weight by %.3g (relative max)", TORCH_INT4, n, k, drift)
        return Prepared(lambda x: mm(x, packed, gs, scales_and_zeros), w64,
                        packed.nbytes + scales_and_zeros.nbytes, gs)

    return Impl(TORCH_INT4, f"aten {names[1]}", torch.bfloat16, 4, prepare)


def _bnb_nf4(device: torch.device) -> Impl | None:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as exc:  # ImportError, or a broken install failing at import time
        logger.warning("skipping %s: bitsandbytes is not importable (%s: %s)", BNB_NF4, type(exc).__name__, exc)
        return None

    def prepare(layer: Layer, bits: int) -> Prepared:
        # bitsandbytes quantizes the original layer its own way (NF4, absmax per 64 values, its
        # defaults); the accuracy reference is its own dequantization of that.
        w4, state = bnbF.quantize_4bit(layer.linear.weight.detach(), quant_type="nf4")
        w64 = bnbF.dequantize_4bit(w4, state).double()
        nbytes = w4.nbytes + state.absmax.nbytes + state.code.nbytes
        return Prepared(lambda x: bnb.matmul_4bit(x, w4.t(), quant_state=state), w64, nbytes, state.blocksize)

    return Impl(BNB_NF4, f"bitsandbytes {bnb.__version__}", torch.float16, 4, prepare)


def discover_impls(device: torch.device, wanted: list[str] | None, dtypes: list[torch.dtype],
                   act_order: bool = False) -> list[Impl]:
    impls = []
    for backend in BACKENDS:
        name = OURS + backend
        if wanted and name not in wanted:
            continue
        # Only backends with their own kernel: a backend without one would run the op's default.
        if not lightllm.backends.has_kernel(ops_gptq.MATMUL, backend, device.type):
            reason = why_unavailable(backend) or f"no {backend} kernel for {ops_gptq.MATMUL} on {device.type}"
            logger.info("skipping %s on %s: %s", name, device.type, reason)
            continue
        for dtype in dtypes:
            impls.append(_ours(backend, dtype))
            if act_order:
                impls.append(_ours(backend, dtype, act_order=True))

    denominator = DENSE_FP32 if device.type == "cpu" else CUBLAS_FP16
    if wanted and denominator not in wanted:
        logger.info("timing %s anyway: it is the denominator of every speedup", denominator)
    if device.type == "cpu":
        impls.append(_cublas(torch.float32))
    if device.type != "cpu" or not wanted or CUBLAS_FP16 in wanted:
        impls.append(_cublas(torch.float16))
    if not wanted or CUBLAS_BF16 in wanted:
        impls.append(_cublas(torch.bfloat16))
    if device.type != "cpu" and wanted and DENSE_FP32 in wanted:
        impls.append(_cublas(torch.float32))
    if not wanted or TORCH_INT4 in wanted:
        impls.append(_torch_int4(device))
    if not wanted or BNB_NF4 in wanted:
        impls.append(_bnb_nf4(device))
    return [i for i in impls if i is not None]


# ---- accuracy -------------------------------------------------------------------------------

def check_accuracy(y: torch.Tensor, x: torch.Tensor, weight64: torch.Tensor, dtype: torch.dtype) -> dict:
    """Max relative error of ``y`` against the float64 product, and cuBLAS's in ``dtype`` on the same
    weight (its rounding of x, W and y is the floor any kernel in that dtype can reach).

    Relative error = max|y - y64| / max|y64|: elementwise relative error is meaningless for outputs
    near zero. The bar is twice cuBLAS's error, but never below one rounding of the output in
    ``dtype`` (eps / 2), so that a lucky exact cuBLAS result cannot fail everyone else.
    """
    ref = x.double() @ weight64.t()
    scale = float(ref.abs().max()) or 1.0
    if tuple(y.shape) != tuple(ref.shape):
        return {"max_rel_err": None, "cublas_rel_err": None, "err_ratio": None,
                "accuracy": f"FAIL: shape {tuple(y.shape)}, expected {tuple(ref.shape)}"}
    err = float((y.double() - ref).abs().max()) / scale
    cublas = F.linear(x, weight64.to(dtype))
    cublas_err = float((cublas.double() - ref).abs().max()) / scale
    bar = 2 * max(cublas_err, torch.finfo(dtype).eps / 2)
    if not math.isfinite(err):
        verdict = "FAIL: non-finite output"
    elif err > bar:
        verdict = "FAIL: > 2x cuBLAS"
    else:
        verdict = "ok"
    return {"max_rel_err": err, "cublas_rel_err": cublas_err,
            "err_ratio": err / cublas_err if cublas_err > 0 else None, "accuracy": verdict}


# ---- timing ---------------------------------------------------------------------------------

def time_case(fn: Callable[[], object], sched: Schedule, device: torch.device) -> dict:
    return time_capped(fn, warmup=sched.warmup, iters=sched.iters, eager_iters=sched.eager_iters,
                       eager_repeats=sched.eager_repeats, max_seconds=sched.max_seconds, device=device)


def run_shape(n: int, k: int, impls: list[Impl], plan: dict[int, list[int]], ms: list[int], args,
              sched: Schedule, device: torch.device, copy_bw: float) -> list[dict]:
    logger.info("shape %dx%d (N x K): building the layer", n, k)
    layer = Layer(n, k, args.group_size, not args.asym, device, args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    xs = {m: torch.randn(m, k, generator=gen, device=device).to(torch.float16) for m in ms}
    rows = []
    for impl in impls:
        widths = [(b, plan[b]) for b in plan] if impl.bits is None else [(impl.bits, ms)]
        if impl.backend == "torch" and device.type == "cpu" and not args.full_reference:
            # The reference dequantizes the whole weight per call: once per shape is the "before" number.
            first = 4 if 4 in plan else next(iter(plan))
            widths = [(first, plan[first][:1])]
        for bits, bits_ms in widths:
            try:
                prep = impl.prepare(layer, bits)
            except Skip as exc:
                logger.warning("skipping %s at %dx%d: %s", impl.name, n, k, exc)
                continue
            except Exception as exc:
                logger.warning("skipping %s at %dx%d: setup failed (%s: %s)", impl.name, n, k, type(exc).__name__, exc,
                               exc_info=logger.isEnabledFor(logging.DEBUG))
                continue
            elem = torch.finfo(impl.dtype).bits // 8
            for m in bits_ms:
                x = xs[m].to(impl.dtype)
                try:
                    with impl.scope(), torch.no_grad():
                        y = prep.call(x)  # also compiles (Triton) before anything is timed
                        acc = check_accuracy(y, x, prep.weight64, impl.dtype)
                        del y
                        timing = time_case(lambda: prep.call(x), sched, device)
                except Exception as exc:  # a kernel that cannot run this case (or runs out of memory)
                    logger.warning("%s %dx%d M=%d bits=%d failed, no row: %s: %s", impl.name, n, k, m, bits,
                                   type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                nbytes = prep.weight_bytes + m * k * elem + m * n * elem
                row = {"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "bits": bits, "impl": impl.name,
                       "backend": impl.backend, "dtype": str(impl.dtype).removeprefix("torch."),
                       "group_size": prep.group_size or "", **timing, "bytes": nbytes,
                       "gbps": nbytes / (timing["device_us"] * 1e-6) / 1e9, **acc}
                row["frac_copy_bw"] = row["gbps"] * 1e9 / copy_bw
                (logger.warning if row["accuracy"] != "ok" else logger.info)(
                    "%-15s %dx%d M=%-4d w%-2d %9.1f us (eager %.1f us)  err %.2g (cuBLAS %.2g) %s", impl.name,
                    n, k, m, bits, row["device_us"], row["eager_us"], acc["max_rel_err"] or float("nan"),
                    acc["cublas_rel_err"] or float("nan"), acc["accuracy"])
                rows.append(row)
            del prep
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del layer, xs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speedup over cublas-fp16 at the same shape and M, device time and eager time; also over
    cuBLAS in the row's own dtype (bf16 for torch-int4, as public tinygemm numbers are quoted), and
    over dense-fp32 where it ran (the CPU's baseline)."""
    base = {(r["impl"], r["shape"], r["m"]): r for r in rows if r["impl"] in (CUBLAS_FP16, CUBLAS_BF16, DENSE_FP32)}
    for r in rows:
        b = base.get((CUBLAS_FP16, r["shape"], r["m"]))
        r["speedup_vs_cublas_fp16"] = b["device_us"] / r["device_us"] if b else None
        r["eager_speedup_vs_cublas_fp16"] = b["eager_us"] / r["eager_us"] if b else None
        same = base.get(({"bfloat16": CUBLAS_BF16, "float32": DENSE_FP32}.get(r["dtype"], CUBLAS_FP16), r["shape"],
                         r["m"]))
        r["speedup_vs_cublas_same_dtype"] = same["device_us"] / r["device_us"] if same else None
        f32 = base.get((DENSE_FP32, r["shape"], r["m"]))
        r["speedup_vs_fp32"] = f32["device_us"] / r["device_us"] if f32 else None


# ---- plot -----------------------------------------------------------------------------------

def plot_speedup(rows: list[dict], shapes: list[str], path: Path, tags: dict, subtitle: str,
                 baseline: str = CUBLAS_FP16) -> None:
    """Speedup over ``baseline`` (cublas-fp16, or dense-fp32 on the CPU) against M (log-log), one
    panel per shape, one line per implementation, dtype and bit width; points that fail the accuracy
    bar are circled in red."""
    key = "speedup_vs_fp32" if baseline == DENSE_FP32 else "speedup_vs_cublas_fp16"
    several_dtypes = len({r["dtype"] for r in rows if r["impl"].startswith(OURS)}) > 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    def label(r):
        if not r["impl"].startswith(OURS):
            return r["impl"]
        return f"{r['impl']} w{r['bits']}" + (f" {r['dtype']}" if several_dtypes else "")

    # The baseline itself is the dashed line at 1x.
    points = [r for r in rows if r.get(key) and r["impl"] != baseline]
    if not points:
        logger.warning("no speedups to plot (no rows besides %s, or no %s rows)", baseline, baseline)
        return
    series = list(dict.fromkeys(label(r) for r in points))
    colours = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(series)}
    cols = min(3, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols + 2.2, 4.0 * nrows), squeeze=False)
    any_failed = False
    for ax, shape in zip(axes.flat, shapes):
        for s in series:
            pts = sorted((r["m"], r[key], r["accuracy"] != "ok")
                         for r in points if r["shape"] == shape and label(r) == s)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colours[s])
            bad = [p for p in pts if p[2]]
            if bad:
                any_failed = True
                ax.scatter([p[0] for p in bad], [p[1] for p in bad], s=90, facecolors="none",
                           edgecolors="red", linewidths=1.5, zorder=5)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
        ax.set_title(f"N x K = {shape}", fontsize=10)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel(f"speedup over {baseline} (device time)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[s], marker="o", markersize=4, label=s) for s in series]
    handles.append(Line2D([], [], color="black", linestyle="--", label=baseline))
    if any_failed:
        handles.append(Line2D([], [], marker="o", markersize=9, linestyle="none", markerfacecolor="none",
                              markeredgecolor="red", label="fails the accuracy bar"))
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"weight-only low-bit matmul y = x W^T, {subtitle}\n{tags.get('card', '?')}, "
                 f"{tags.get('date', '?')[:10]}, commit {tags.get('commit', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (5.2 * cols + 2.2), 1))
    save_figure(fig, path)


# ---- CLI ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time lightllm's GPTQ dequant-matmul (QuantLinear, every backend that runs on the device) "
                    "against cuBLAS fp16/bf16, torch's int4 kernel and bitsandbytes NF4, after checking each "
                    "output against a float64 matmul with the same weight.",
        epilog="Shapes are N x K (out x in features), M is the number of rows of x. Defaults on a GPU: shapes "
               + " ".join(f"{n}x{k}" for n, k in GPU_SHAPES) + ", M " + " ".join(map(str, GPU_M))
               + "; 4 bits at every M and 3 bits at M=1. On the CPU: shapes "
               + " ".join(f"{n}x{k}" for n, k in CPU_SHAPES) + ", M " + " ".join(map(str, CPU_M))
               + ", bits 4 3 2 8 at every M, ours in float16 and bfloat16, the reference once per shape, speedups over "
               "dense-fp32 (float32 F.linear); set TRITON_INTERPRET=1 before launching to include the Triton "
               "interpreter (small shapes only). "
               "Results are appended to the CSV (tagged with card, date and commit); the PNG plot of speedup over "
               "the baseline against M goes next to it. Timing: CUDA events on a GPU, wall time on the CPU, caches "
               "flushed before each timed call; eager time is host wall time per back-to-back call.",
    )
    p.add_argument("--quick", action="store_true",
                   help="GPU: shapes " + " ".join(f"{n}x{k}" for n, k in QUICK_SHAPES) + " and M "
                        + " ".join(map(str, QUICK_M)) + ", fewer iterations (about 2 minutes on an H100); "
                        "CPU: M " + " ".join(map(str, CPU_QUICK_M)) + ", fewer iterations")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--shapes", type=size_pair, nargs="+", default=None, metavar="NxK",
                   help="weight shapes, N (out) x K (in), e.g. 4096x4096 11008x4096")
    p.add_argument("--m", type=positive_int, nargs="+", default=None, metavar="M", help="rows of x, e.g. 1 16 64")
    p.add_argument("--bits", type=int, nargs="+", default=None, choices=GPTQ_BITS, metavar="BITS",
                   help=f"bit widths of ours ({', '.join(map(str, GPTQ_BITS))}), each at every M "
                        "(default: 4 at every M and 3 at M=1). The torch-int4 and bnb-nf4 baselines are 4-bit.")
    p.add_argument("--group-size", type=positive_int, default=128, help="GPTQ group size (default 128)")
    p.add_argument("--act-order", action="store_true",
                   help="also time each lightllm backend on the same codes with an act-order g_idx (target: at most "
                        "5%% slower)")
    p.add_argument("--asym", action="store_true",
                   help="asymmetric RTN (a zero point per group) instead of the symmetric grid most GPTQ checkpoints "
                        "use; the kernels' work is the same, but it exercises the zero-point conversions")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=None,
                   help="activation dtypes of ours (default float16, the dtype of GPTQ scales; on the CPU float16 "
                        "and bfloat16, torch-int4's dtype)")
    p.add_argument("--full-reference", action="store_true",
                   help="CPU: time the reference backend at every bit width and M (by default once per shape: it "
                        "dequantizes the whole weight per call)")
    p.add_argument("--impl", nargs="+", default=None, choices=IMPL_CHOICES, metavar="IMPL",
                   help="only these implementations: " + ", ".join(IMPL_CHOICES)
                        + f" (default: all that run on the device; {CUBLAS_FP16} is always timed)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per case (overrides the schedule)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (overrides the schedule)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time cap per case: iteration counts are lowered (not below 3) for slow calls such as "
                        "the reference backend's (default 3 s on CUDA, 1 s with --quick; 6 s and 3 s on the CPU; "
                        "0 = no cap)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (torch.set_num_threads) for a CPU run (default: torch's choice; 1 is "
                        "steadier when other processes keep a core busy)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and inputs")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_quant_matmul.csv",
                   help="CSV to append to (default benchmarks/results/bench_quant_matmul.csv); the plot goes "
                        "next to it with a .png suffix")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


COLUMNS = [
    ("shape", "N x K"), ("m", "M"), ("impl", "impl"), ("bits", "bits"), ("dtype", "dtype"),
    ("device_us", "median us"), ("p20_p80", "p20-p80 us"), ("eager_us", "eager us"), ("gbps", "GB/s"),
    ("pct_copy", "% copy"), ("speedup_vs_cublas_fp16", "vs cuBLAS fp16"), ("max_rel_err", "max rel err"),
    ("err_ratio", "err / cuBLAS"), ("accuracy", "check"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before env_tags, which records the thread count
    sched = schedule_for(device, args.quick)
    sched = Schedule(
        warmup=sched.warmup if args.warmup is None else args.warmup,
        iters=sched.iters if args.iters is None else args.iters,
        eager_iters=sched.eager_iters, eager_repeats=sched.eager_repeats, copy_bytes=sched.copy_bytes,
        max_seconds=sched.max_seconds if args.max_seconds is None else args.max_seconds,
    )
    if device.type == "cuda":
        shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES)
        ms = args.m or (QUICK_M if args.quick else GPU_M)
    else:
        shapes, ms = args.shapes or CPU_SHAPES, args.m or (CPU_QUICK_M if args.quick else CPU_M)
    ms = sorted(dict.fromkeys(ms))
    plan = bits_plan(args.bits, ms, device)
    dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtype or (["float16", "bfloat16"] if device.type == "cpu"
                                                              else ["float16"]))]
    for bits in plan:
        multiple = values_per_chunk(bits)[0]
        for n, k in shapes:
            if n % multiple or k % multiple:
                raise SystemExit(f"shape {n}x{k}: {bits}-bit GPTQ needs N and K to be multiples of {multiple}")

    cpu_malloc = ""
    if device.type == "cpu":
        # Keep freed memory for reuse, as a caching allocator would (see _timing.retain_freed_cpu_memory).
        cpu_malloc = "retain" if retain_freed_cpu_memory() else "default"
    tags = env_tags(device)
    logger.info("device %s (%s), shapes %s, M %s, bits %s, commit %s", device, tags["card"],
                " ".join(f"{n}x{k}" for n, k in shapes), ms, {b: len(v) for b, v in plan.items()}, tags["commit"])
    busy = warn_if_busy(device)

    impls = discover_impls(device, args.impl, dtypes, act_order=args.act_order)
    logger.info("implementations: %s", ", ".join(f"{i.name} ({str(i.dtype).removeprefix('torch.')})" for i in impls))
    if device.type == "cpu":
        logger.info("on the CPU the cublas-* rows are torch's CPU F.linear; Triton (if any) runs in its interpreter")
        native = lightllm._native.cpp_module()
        if native is not None and hasattr(native, "gptq_cpu_isa"):
            logger.info("C++ GEMV instruction set: %s", native.gptq_cpu_isa())

    copy_bw = measure_copy_bandwidth(device, sched.copy_bytes)
    logger.info("copy bandwidth (read + write): %.1f GB/s", copy_bw / 1e9)

    rows = []
    for n, k in shapes:
        rows += run_shape(n, k, impls, plan, ms, args, sched, device, copy_bw)
    if not rows:
        raise SystemExit("no case ran; see the log")
    add_speedups(rows)
    for r in rows:
        r["device"] = device.type
        r["copy_gbps"] = copy_bw / 1e9
        r["cpu_malloc"] = cpu_malloc
        r["others_busy"] = "" if busy is None else round(busy, 3)
    CsvWriter(args.out, tags).write(rows)
    shape_names = [f"{n}x{k}" for n, k in shapes]
    baseline = DENSE_FP32 if device.type == "cpu" else CUBLAS_FP16
    plot_speedup(rows, shape_names, args.out.with_suffix(".png"), tags,
                 f"group size {args.group_size}, {device.type} ({rows[0]['method']})", baseline)

    # The table: by shape, then M, then implementation in discovery order.
    order = {}
    for j, i in enumerate(impls):
        order.setdefault(i.name, j)
    rows.sort(key=lambda r: (shape_names.index(r["shape"]), r["m"], order[r["impl"]], r["dtype"], -r["bits"]))
    for r in rows:
        r["p20_p80"] = f"{fmt_float(r['device_us_p20'])}-{fmt_float(r['device_us_p80'])}"
        r["pct_copy"] = 100 * r["frac_copy_bw"]
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | torch {tags['torch']} | "
          f"triton {tags['triton']} | timing: {rows[0]['method']} | copy bandwidth {copy_bw / 1e9:.1f} GB/s"
          + (f" | malloc {cpu_malloc}" if cpu_malloc else ""))
    columns = COLUMNS
    if device.type == "cpu":  # the CPU's baseline is float32 F.linear
        columns = [c if c[0] != "speedup_vs_cublas_fp16" else ("speedup_vs_fp32", "vs fp32 F.linear") for c in COLUMNS]
    print(format_table(rows, columns))
    if device.type == "cpu":
        print("\nCPU run: cublas-* rows are torch's CPU F.linear; Triton rows (if any) are the interpreter, "
              "so their times mean nothing.")
    failed = [r for r in rows if r["accuracy"] != "ok"]
    if failed:
        print(f"\n{len(failed)} row(s) fail the accuracy bar (error more than twice cuBLAS's in the same dtype "
              "on the same weight); see the 'check' column.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
