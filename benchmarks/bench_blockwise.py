#!/usr/bin/env python
"""Benchmark block-wise 8-bit quantize / dequantize: every lightllm backend against bitsandbytes.

For each input dtype and block size, every lightllm backend that runs on the chosen device
("cuda", "triton", "torch" on a GPU; "cpp", "torch" on the CPU) and bitsandbytes' own
``quantize_blockwise`` / ``dequantize_blockwise`` are first checked against the reference ("torch"
backend) on the same input, then timed. Each row gives device time (CUDA events, or CPU wall
time, caches flushed before each call), eager time per call, achieved bandwidth and its fraction of the copy bandwidth
measured in the same run, and the speedup over bitsandbytes. Extra rows with op "overhead" compare,
on a tiny input, the eager cost of the public function with the op call and the bare kernel.

Examples:
    python benchmarks/bench_blockwise.py --quick --device cpu
    python benchmarks/bench_blockwise.py                      # full run on the GPU if there is one
    python benchmarks/bench_blockwise.py --blocksize 256 --dtype float32 --impl cuda bitsandbytes

Writes rows to benchmarks/results/bench_blockwise.csv (appending; every row is tagged with card,
date, commit) and a plot next to it (same name, .png); prints a table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    bench_device,
    bench_eager,
    env_tags,
    fmt_float,
    format_table,
    measure_copy_bandwidth,
    plot_bars,
    resolve_device,
    retain_freed_cpu_memory,
    setup_logging,
    warn_if_busy,
)

import lightllm  # noqa: E402
from lightllm import _native  # noqa: E402
from lightllm import functional as F  # noqa: E402
from lightllm.backends import BACKENDS, BackendUnavailableError, resolve  # noqa: E402
from lightllm.ops import blockwise as ops_blockwise  # noqa: E402

logger = logging.getLogger("benchmarks.blockwise")

BNB = "bitsandbytes"
REFERENCE = "torch"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- run settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Iteration counts. The CPU ones are small: the torch reference quantizes 2**24 values in about
    0.3 s on 2 cores, and a full CPU run should stay near a minute."""

    warmup: int
    iters: int  # timed calls for the device time
    eager_iters: int  # back-to-back calls per eager repeat
    eager_repeats: int
    overhead_iters: int  # back-to-back calls per eager repeat on the tiny input
    copy_bytes: int


def schedule_for(device: torch.device, quick: bool) -> Schedule:
    if device.type == "cuda":
        if quick:
            return Schedule(warmup=3, iters=15, eager_iters=5, eager_repeats=3, overhead_iters=100, copy_bytes=1 << 30)
        return Schedule(warmup=5, iters=50, eager_iters=20, eager_repeats=5, overhead_iters=500, copy_bytes=1 << 30)
    # On the CPU 256 MB per buffer is far beyond the last-level cache and spares the RAM.
    if quick:
        return Schedule(warmup=1, iters=3, eager_iters=1, eager_repeats=3, overhead_iters=100, copy_bytes=1 << 28)
    return Schedule(warmup=1, iters=7, eager_iters=2, eager_repeats=3, overhead_iters=500, copy_bytes=1 << 28)


def default_numel(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 2**26 if quick else 2**28
    return 2**22 if quick else 2**24


# ---- implementations ------------------------------------------------------------------------

QuantizeFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
DequantizeFn = Callable[[torch.Tensor, torch.Tensor, int, torch.dtype], torch.Tensor]


@dataclass
class Impl:
    """One implementation. ``scope()`` wraps every call (selects the lightllm backend), entered once
    around a whole measurement so that its own cost is not timed.

    ``quantize``/``dequantize`` are the public entry points; ``paths`` maps a variant name to
    (quantize, dequantize) callables for the overhead rows, the public one first.
    """

    name: str
    scope: Callable[[], contextlib.AbstractContextManager]
    quantize: QuantizeFn
    dequantize: DequantizeFn
    paths: dict[str, tuple[QuantizeFn, DequantizeFn]]


def _lightllm_impl(backend: str, device: torch.device) -> Impl:
    code = F.create_dynamic_map().to(device)

    def quantize(x, bs):
        return F.quantize_blockwise(x, blocksize=bs)

    def dequantize(codes, absmax, bs, dtype):
        return F.dequantize_blockwise(codes, absmax, blocksize=bs, dtype=dtype)

    # The same call one layer down: the registered op, past the functional argument checks.
    def op_quantize(x, bs):
        return torch.ops.lightllm.quantize_blockwise(x, code, bs)

    def op_dequantize(codes, absmax, bs, dtype):
        return torch.ops.lightllm.dequantize_blockwise(codes, absmax, code, bs, dtype)

    paths = {"functional": (quantize, dequantize), "torch.ops": (op_quantize, op_dequantize)}
    direct = _direct_kernels(backend, code)
    if direct is not None:
        paths["direct"] = direct
    return Impl(backend, lambda: lightllm.use_backend(backend), quantize, dequantize, paths)


def _direct_kernels(backend: str, code: torch.Tensor) -> tuple[QuantizeFn, DequantizeFn] | None:
    """The backend's kernel entry points, called with everything prepared (no checks, no dispatch)."""
    if backend in ("cpp", "cuda"):
        native = _native.cpp_module() if backend == "cpp" else _native.cuda_module()
        return (lambda x, bs: native.quantize_blockwise(x, code, bs),
                lambda c, a, bs, dt: native.dequantize_blockwise(c, a, code, bs, dt))
    if backend == "torch":
        return (lambda x, bs: ops_blockwise.quantize_blockwise_reference(x, code, bs),
                lambda c, a, bs, dt: ops_blockwise.dequantize_blockwise_reference(c, a, code, bs, dt))
    if backend == "triton":
        try:
            from lightllm.kernels import blockwise as triton_blockwise

            # The kernel takes the map's search tables; the op builds and caches them per map,
            # here they are built once up front (a private helper, so it may move).
            table, bucket_start, steps = ops_blockwise._triton_search_tables(code)
        except (ImportError, AttributeError) as exc:
            logger.warning("triton: no direct path for the overhead rows (%s)", exc)
            return None
        return (lambda x, bs: triton_blockwise.quantize_blockwise(x, table, bucket_start, steps, bs),
                lambda c, a, bs, dt: triton_blockwise.dequantize_blockwise(c, a, code, bs, dt))
    return None


def _bnb_impl(device: torch.device) -> Impl | None:
    try:
        import bitsandbytes.functional as bnbF
    except Exception as exc:  # ImportError, or a broken install failing at import time
        logger.warning("bitsandbytes is not importable (%s: %s); no baseline rows", type(exc).__name__, exc)
        return None
    code = bnbF.create_dynamic_map().to(device)
    if not torch.equal(code.cpu(), F.create_dynamic_map()):
        logger.warning("bitsandbytes' dynamic map differs from lightllm's; its codes cannot match")

    def quantize(x, bs):
        codes, state = bnbF.quantize_blockwise(x, code=code, blocksize=bs)
        return codes, state.absmax

    def dequantize(codes, absmax, bs, dtype):
        # bnb 0.50: with absmax= and code= the output is always float32; another output dtype
        # needs a QuantState. Building it is a few microseconds, small next to the call itself.
        if dtype == torch.float32:
            return bnbF.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=bs)
        state = bnbF.QuantState(absmax=absmax, code=code, blocksize=bs, dtype=dtype)
        return bnbF.dequantize_blockwise(codes, quant_state=state)

    paths: dict[str, tuple[QuantizeFn, DequantizeFn]] = {"functional": (quantize, dequantize)}
    ops = getattr(torch.ops, "bitsandbytes", None)
    if ops is not None and hasattr(ops, "quantize_blockwise"):
        paths["torch.ops"] = (lambda x, bs: ops.quantize_blockwise.default(x, code, bs),
                              lambda c, a, bs, dt: ops.dequantize_blockwise.default(c, a, code, bs, dt))
    return Impl(BNB, contextlib.nullcontext, quantize, dequantize, paths)


def discover_impls(device: torch.device, wanted: list[str] | None) -> list[Impl]:
    if REFERENCE not in lightllm.available_backends():
        raise SystemExit("the reference backend 'torch' is not available; nothing to check against")
    impls = []
    for backend in lightllm.available_backends():
        if wanted and backend not in wanted:
            continue
        if backend == "triton" and device.type == "cpu":
            logger.info("skipping triton on the CPU: it only runs in the (very slow) interpreter there")
            continue
        try:
            with lightllm.use_backend(backend):
                resolve(ops_blockwise.QUANTIZE, device)
                resolve(ops_blockwise.DEQUANTIZE, device)
        except BackendUnavailableError as exc:
            logger.info("skipping %s on %s: %s", backend, device.type, exc)
            continue
        impls.append(_lightllm_impl(backend, device))
    if not wanted or BNB in wanted:
        bnb = _bnb_impl(device)
        if bnb is not None:
            impls.append(bnb)
    return impls


# ---- correctness check ----------------------------------------------------------------------

def check_quantize(codes, absmax, ref_codes, ref_absmax) -> str:
    if codes.shape != ref_codes.shape or absmax.numel() != ref_absmax.numel():
        return f"MISMATCH: shapes {tuple(codes.shape)}/{absmax.numel()} vs {tuple(ref_codes.shape)}/{ref_absmax.numel()}"
    bad_codes = int((codes != ref_codes).sum())
    bad_absmax = int((absmax.reshape(-1) != ref_absmax.reshape(-1)).sum())
    if bad_codes == 0 and bad_absmax == 0:
        return "ok"
    max_step = int((codes.int() - ref_codes.int()).abs().max()) if bad_codes else 0
    return f"MISMATCH: {bad_codes / codes.numel():.3%} codes (off by <= {max_step}), {bad_absmax} absmax"


def check_dequantize(out, ref_out) -> str:
    if out.shape != ref_out.shape or out.dtype != ref_out.dtype:
        return f"MISMATCH: {out.dtype}{tuple(out.shape)} vs {ref_out.dtype}{tuple(ref_out.shape)}"
    bad = int((out != ref_out).sum())
    if bad == 0:
        return "ok"
    diff = float((out.float() - ref_out.float()).abs().max())
    return f"MISMATCH: {bad / out.numel():.3%} values (max abs diff {diff:.3g})"


# ---- measurements ---------------------------------------------------------------------------

def traffic_bytes(numel: int, blocksize: int, dtype: torch.dtype) -> int:
    """Bytes that must move: the float values, one code byte each, and the float32 absmax
    (written by quantize, read by dequantize)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return numel * (elem + 1) + (-(-numel // blocksize)) * 4


def time_case(impl: Impl, fn: Callable[[], object], sched: Schedule, device: torch.device) -> dict:
    with impl.scope():
        dev = bench_device(fn, warmup=sched.warmup, iters=sched.iters, device=device)
        eager = bench_eager(fn, warmup=0, iters=sched.eager_iters, repeats=sched.eager_repeats, device=device)
    return {"method": dev.method, "device_us": dev.median_us, "device_us_p20": dev.p20_us,
            "device_us_p80": dev.p80_us, "eager_us": eager.median_us}


def bench_main_cases(impls: list[Impl], device: torch.device, numel: int, blocksizes: list[int],
                     dtypes: list[str], sched: Schedule, copy_bw: float, seed: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(seed)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.randn(numel, generator=gen, device=device, dtype=torch.float32).to(dtype)
        for bs in blocksizes:
            with lightllm.use_backend(REFERENCE):
                ref_codes, ref_absmax = F.quantize_blockwise(x, blocksize=bs)
                ref_out = F.dequantize_blockwise(ref_codes, ref_absmax, blocksize=bs, dtype=dtype)
            for impl in impls:
                for op in ("quantize", "dequantize"):
                    logger.info("%s %s %s numel=%d blocksize=%d", impl.name, op, dtype_name, numel, bs)
                    with impl.scope():
                        if op == "quantize":
                            codes, absmax = impl.quantize(x, bs)
                            check = check_quantize(codes, absmax, ref_codes, ref_absmax)
                            del codes, absmax
                            fn = lambda: impl.quantize(x, bs)  # noqa: E731
                        else:
                            out = impl.dequantize(ref_codes, ref_absmax, bs, dtype)
                            check = check_dequantize(out, ref_out)
                            del out
                            fn = lambda: impl.dequantize(ref_codes, ref_absmax, bs, dtype)  # noqa: E731
                    if check != "ok":
                        logger.warning("%s %s %s blocksize=%d: %s (timed anyway, row marked)",
                                       impl.name, op, dtype_name, bs, check)
                    row = {"impl": impl.name, "op": op, "variant": "functional", "dtype": dtype_name,
                           "numel": numel, "blocksize": bs, "check": check}
                    row.update(time_case(impl, fn, sched, device))
                    nbytes = traffic_bytes(numel, bs, dtype)
                    row["bytes"] = nbytes
                    row["gbps"] = nbytes / (row["device_us"] * 1e-6) / 1e9
                    row["frac_copy_bw"] = row["gbps"] * 1e9 / copy_bw
                    rows.append(row)
            del ref_codes, ref_absmax, ref_out
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Speedup over bitsandbytes, same op / dtype / block size, both measured in this run.
    baseline = {(r["op"], r["dtype"], r["blocksize"]): r["device_us"] for r in rows if r["impl"] == BNB}
    for r in rows:
        base = baseline.get((r["op"], r["dtype"], r["blocksize"]))
        r["speedup_vs_bnb"] = base / r["device_us"] if base else None
    return rows


def bench_overhead(impls: list[Impl], device: torch.device, numel: int, blocksize: int, sched: Schedule,
                   seed: int) -> list[dict]:
    """Eager cost per call on a tiny input along each call path (public function, op, bare kernel)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(numel, generator=gen, device=device)
    with lightllm.use_backend(REFERENCE):
        codes, absmax = F.quantize_blockwise(x, blocksize=blocksize)
    rows = []
    for impl in impls:
        for op_index, op in enumerate(("quantize", "dequantize")):
            eager_by_path = {}
            for path, fns in impl.paths.items():
                f = fns[op_index]
                if op == "quantize":
                    fn = lambda f=f: f(x, blocksize)  # noqa: E731
                else:
                    fn = lambda f=f: f(codes, absmax, blocksize, torch.float32)  # noqa: E731
                logger.info("overhead: %s %s via %s", impl.name, op, path)
                # On CUDA the flush keeps the GPU busy while the host enqueues the tiny call (see
                # bench_device). On the CPU it would also evict the interpreter's own state and time
                # a cold Python call instead of the op.
                with impl.scope():
                    dev = bench_device(fn, warmup=10, iters=max(10, sched.iters), flush_l2=device.type == "cuda",
                                       device=device)
                    eager = bench_eager(fn, warmup=10, iters=sched.overhead_iters, repeats=5, device=device)
                eager_by_path[path] = eager.median_us
                rows.append({"impl": impl.name, "op": "overhead", "variant": f"{op} {path}", "dtype": "float32",
                             "numel": numel, "blocksize": blocksize, "method": dev.method,
                             "device_us": dev.median_us, "device_us_p20": dev.p20_us, "device_us_p80": dev.p80_us,
                             "eager_us": eager.median_us})
            # Extra eager cost of each path over the barest one measured.
            barest = eager_by_path.get("direct", eager_by_path.get("torch.ops"))
            for r in rows[-len(impl.paths):]:
                r["overhead_us"] = r["eager_us"] - barest if barest is not None else None
    return rows


# ---- CLI ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time lightllm's block-wise 8-bit quantize/dequantize on every backend that runs on the "
                    "device, against bitsandbytes, with the device copy bandwidth as the ceiling.",
        epilog="Results are appended to the CSV (tagged with card, date and commit); a PNG plot of achieved "
               "GB/s is written next to it. Timing: CUDA events on a GPU, wall time on the CPU, caches flushed before each timed call.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smaller input and fewer iterations (2**26 values on CUDA, 2**22 on the CPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--numel", type=int, default=None,
                   help="values per input tensor (default 2**28 on CUDA, 2**24 on the CPU; see --quick)")
    p.add_argument("--blocksize", type=int, nargs="+", default=[4096, 256],
                   help="block sizes to test, powers of two 64..4096 (default: 4096 256; the optimizers use 256)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "float16"],
                   help="input dtype for quantize / output dtype for dequantize (default: float32 float16)")
    p.add_argument("--impl", nargs="+", default=None, choices=BACKENDS + (BNB,), metavar="IMPL",
                   help="only these implementations: lightllm backend names (cuda triton cpp torch) "
                        f"and/or {BNB} (default: all that run on the device)")
    p.add_argument("--overhead-numel", type=int, default=4096,
                   help="values in the tiny input of the 'overhead' rows (default 4096)")
    p.add_argument("--no-overhead", action="store_true", help="skip the 'overhead' rows")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (overrides the schedule)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (overrides the schedule)")
    p.add_argument("--copy-bytes", type=int, default=None,
                   help="buffer size for the copy-bandwidth ceiling (default 1 GiB on CUDA, 256 MiB on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads) for a CPU run (default: torch's choice)")
    p.add_argument("--cpu-page-faults", action="store_true",
                   help="CPU: leave glibc's allocator as it is, so that every large output is page-faulted in "
                        "anew (by default freed memory is kept for reuse; see _timing.retain_freed_cpu_memory)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_blockwise.csv",
                   help="CSV to append to (default benchmarks/results/bench_blockwise.csv); the plot goes "
                        "next to it with a .png suffix")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    for bs in args.blocksize:
        if not (64 <= bs <= 4096 and bs & (bs - 1) == 0):
            p.error(f"--blocksize {bs}: must be a power of two from 64 to 4096")
    if args.numel is not None and args.numel < 1:
        p.error("--numel must be positive")
    return args


MAIN_COLUMNS = [
    ("impl", "impl"), ("op", "op"), ("dtype", "dtype"), ("blocksize", "bs"), ("device_us", "median us"),
    ("p20_p80", "p20-p80 us"), ("eager_us", "eager us"), ("gbps", "GB/s"), ("pct_copy", "% copy"),
    ("speedup_vs_bnb", "vs bnb"), ("check", "check"),
]
OVERHEAD_COLUMNS = [
    ("impl", "impl"), ("variant", "path"), ("eager_us", "eager us/call"), ("overhead_us", "extra us"),
    ("device_us", "device us"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before env_tags, which records the thread count
    sched = schedule_for(device, args.quick)
    if args.iters is not None or args.warmup is not None or args.copy_bytes is not None:
        sched = Schedule(
            warmup=sched.warmup if args.warmup is None else args.warmup,
            iters=sched.iters if args.iters is None else args.iters,
            eager_iters=sched.eager_iters, eager_repeats=sched.eager_repeats,
            overhead_iters=sched.overhead_iters,
            copy_bytes=sched.copy_bytes if args.copy_bytes is None else args.copy_bytes,
        )
    numel = args.numel or default_numel(device, args.quick)
    cpu_malloc = ""
    if device.type == "cpu":
        cpu_malloc = "default"
        if not args.cpu_page_faults:
            if retain_freed_cpu_memory():
                cpu_malloc = "retain"
            else:
                logger.warning("could not tune the C allocator (not glibc?): large outputs are page-faulted "
                               "in on every call and CPU times include that")
    tags = env_tags(device)
    logger.info("device %s (%s), numel %d, block sizes %s, commit %s", device, tags["card"], numel,
                args.blocksize, tags["commit"])

    busy = warn_if_busy(device)
    impls = discover_impls(device, args.impl)
    if not impls:
        raise SystemExit("no implementation to benchmark")
    logger.info("implementations: %s", ", ".join(i.name for i in impls))

    copy_bw = measure_copy_bandwidth(device, sched.copy_bytes)
    logger.info("copy bandwidth (read + write): %.1f GB/s", copy_bw / 1e9)

    rows = bench_main_cases(impls, device, numel, args.blocksize, args.dtype, sched, copy_bw, args.seed)
    overhead_rows = [] if args.no_overhead else bench_overhead(
        impls, device, args.overhead_numel, args.blocksize[0], sched, args.seed)

    for r in rows + overhead_rows:
        r["device"] = device.type
        r["copy_gbps"] = copy_bw / 1e9
        r["cpu_malloc"] = cpu_malloc
        r["others_busy"] = "" if busy is None else round(busy, 3)
    CsvWriter(args.out, tags).write(rows + overhead_rows)
    plot_bars(rows, args.out.with_suffix(".png"),
              group_key=lambda r: f"{r['op']} {r['dtype']} bs{r['blocksize']}",
              series_key=lambda r: r["impl"], value_key="gbps",
              ylabel="achieved GB/s (float + code + absmax bytes)",
              marked=lambda r: r["check"] != "ok", marked_label="differs from the reference", logy=True,
              title=f"block-wise 8-bit quantize / dequantize, {numel} values, {device.type} ({rows[0]['method']})",
              tags=tags, hline=copy_bw / 1e9, hline_label="copy bandwidth")

    for r in rows:
        r["p20_p80"] = f"{fmt_float(r['device_us_p20'])}-{fmt_float(r['device_us_p80'])}"
        r["pct_copy"] = 100 * r["frac_copy_bw"]
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | torch {tags['torch']} | "
          f"numel {numel} | timing: {rows[0]['method']} | copy bandwidth {copy_bw / 1e9:.1f} GB/s"
          + (f" | malloc {cpu_malloc}" if cpu_malloc else ""))
    print(format_table(rows, MAIN_COLUMNS))
    if overhead_rows:
        print(f"\nper-call overhead, {args.overhead_numel} float32 values, blocksize {args.blocksize[0]} "
              "(extra us = eager time over the barest path of the same impl)")
        print(format_table(overhead_rows, OVERHEAD_COLUMNS))
    mismatches = [r for r in rows if r["check"] != "ok"]
    if mismatches:
        print(f"\n{len(mismatches)} row(s) did not match the reference codes/values; see the 'check' column.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
