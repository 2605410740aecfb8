#!/usr/bin/env python
"""Decode-step GEMV on the CPU with the weights coming from memory and everything else warm.

What one decoded token costs per layer: x is one row, each layer's weight was last read a whole
forward pass ago (out of every cache once the model is larger than the last-level cache), while the
Python and C++ code of the call, x and the output stay cached. The other CPU benchmarks flush the
last-level cache before each call, which also evicts the interpreter's and the dispatcher's state and
charges every call for refetching it (measured here: 165 us for a tiny ``F.linear`` and 375 us for a
tiny lightllm op after a flush, against 2 and 15 us warm), a cost a decoding model does not pay per
layer. Here each implementation instead gets enough copies of its weight (together at least twice
the last-level cache) and is called on one copy after the other, in rounds: each call reads a weight
that is no longer cached, as the layers of a model do, and page-table walks are paid too.

Implementations, each on the same random weight [N, K] and x (one row):

* ``lightllm-nf4``: ``matmul_4bit`` (cpp backend; NF4, blocksize 64, float32 absmax) with float32 x
  and with bfloat16 x;
* ``lightllm-gptq``: ``QuantLinear`` (cpp backend; round-to-nearest, group 128, symmetric) at 2, 3,
  4 and 8 bits, bfloat16 x;
* ``lightllm-int8``: ``int8_linear`` (cpp backend, LLM.int8 threshold 0), float16 x;
* ``torch-int4``: ``aten._weight_int4pack_mm_for_cpu`` (group 128, bfloat16 x), torch's own 4-bit
  CPU kernel: the issue's anchor;
* ``bnb-nf4``: ``bitsandbytes.matmul_4bit`` on its own NF4 quantization (bfloat16 x), if installed;
* ``f32-linear``: ``F.linear`` on the float32 weight, the denominator of ``vs f32``.

Each output is checked against float64 (the weight that implementation multiplies by) before
timing. Bandwidth counts the bytes the op must read (weight and its scales) and is quoted against
the copy bandwidth measured in the same run.

Examples:
    python benchmarks/bench_cpu_decode.py                        # 4096x4096 and 11008x4096 (~1 minute)
    python benchmarks/bench_cpu_decode.py --shapes 4096x11008 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    _cpu_last_level_cache_bytes,
    env_tags,
    format_table,
    measure_copy_bandwidth,
    positive_int,
    setup_logging,
    size_pair,
    warn_if_busy,
)
from bench_bnb_layers import BLOCKSIZE, INT4_GROUP, Skip, Weights, rel_err, verdict  # noqa: E402

import lightllm  # noqa: E402
from lightllm.nn.quant_linear import QuantLinear  # noqa: E402
from lightllm.quantization.bnb import int8 as int8_format  # noqa: E402

logger = logging.getLogger("benchmarks.cpu_decode")

SHAPES = [(4096, 4096), (11008, 4096)]
GPTQ_BITS = (2, 3, 4, 8)
ASSUMED_LLC = 64 << 20  # when sysfs does not say


class Impl:
    """One implementation: ``weights`` is one copy of what it reads (tensors or a module),
    ``call(weights)`` its output for the fixed x, ``w64`` the weight it multiplies by."""

    def __init__(self, label, dtype, weights, call, w64, nbytes, x, backend=None):
        self.label, self.dtype, self.weights, self.call = label, dtype, weights, call
        self.w64, self.nbytes, self.x, self.backend = w64, nbytes, x, backend


def _clone(weights):
    if isinstance(weights, torch.nn.Module):
        return copy.deepcopy(weights)
    return tuple(t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t) for t in weights)


def impls(wt: Weights, bnb) -> list[Impl]:
    n, k = wt.n, wt.k
    x32 = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    xb, xh = x32.bfloat16(), x32.half()
    out = []
    packed, absmax, w64 = wt.nf4()
    for x in (x32, xb):
        out.append(Impl("lightllm-nf4", x.dtype, (packed, absmax),
                        lambda w, x=x: torch.ops.lightllm.matmul_4bit(x, w[0], w[1], BLOCKSIZE, "nf4", n, None),
                        w64, packed.nbytes + absmax.nbytes, x, "cpp"))
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(wt.w)
    for bits in GPTQ_BITS:
        q = QuantLinear.from_linear(linear, bits, 128, sym=True).eval()
        nbytes = sum(t.nbytes for t in (q.qweight, q.qzeros, q.scales))
        out.append(Impl(f"lightllm-gptq{bits}", torch.bfloat16, q, lambda w: w(xb),
                        q.dequantize(torch.float64), nbytes, xb, "cpp"))
    cb, scb = wt.int8()
    out.append(Impl("lightllm-int8", torch.float16, (cb, scb),
                    lambda w: torch.ops.lightllm.int8_linear(xh, w[0], w[1], None, 0.0),
                    None, cb.nbytes + scb.nbytes, xh, "cpp"))
    try:
        ipacked, sz, mm, iw64 = wt.int4()
        out.append(Impl("torch-int4", torch.bfloat16, (ipacked, sz), lambda w: mm(xb, w[0], INT4_GROUP, w[1]),
                        iw64, ipacked.nbytes + sz.nbytes, xb))
    except Skip as exc:
        logger.warning("no torch-int4 rows: %s", exc)
    if bnb is not None:
        w4, state = wt.get("bnb-nf4", lambda: bnb.functional.quantize_4bit(wt.w, blocksize=BLOCKSIZE, quant_type="nf4"))
        with lightllm.use_backend("torch"):
            bnb_w64 = torch.ops.lightllm.dequantize_4bit(w4.view(-1), state.absmax, BLOCKSIZE, "nf4", n * k,
                                                         torch.float64).view(n, k)
        out.append(Impl("bnb-nf4", torch.bfloat16, (w4, state), lambda w: bnb.matmul_4bit(xb, w[0].t(), quant_state=w[1]),
                        bnb_w64, w4.nbytes + state.absmax.nbytes, xb))
    out.append(Impl("f32-linear", torch.float32, (wt.w,), lambda w: F.linear(x32, w[0]), wt.w.double(),
                    wt.w.nbytes, x32))
    return out


def check(impl: Impl, y: torch.Tensor) -> tuple[float, float, str]:
    x = impl.x
    if impl.w64 is None:  # LLM.int8: its own pipeline in float64 (the same codes, an exact product)
        cb, scb = impl.weights
        ca, sca, _ = int8_format.int8_vectorwise_quant(x.half(), 0.0)
        exact = (ca.double() @ cb.double().t()) * (sca.double()[:, None] * scb.double()[None, :]) / 127 ** 2
        dense = int8_format.int8_vectorwise_dequant(cb, scb).double()
    else:
        exact, dense = x.double() @ impl.w64.t(), impl.w64
    err = rel_err(y, exact)
    dense_err = rel_err(F.linear(x, dense.to(x.dtype)), x.double() @ dense.t())
    return err, dense_err, verdict(err, dense_err, impl.dtype)


def time_from_memory(impl: Impl, llc: int, rounds: int, max_bytes: int) -> tuple[dict, int]:
    """Per-call wall time over rounds of calls on copies of the weight (together >= 2x the LLC)."""
    copies = max(2, math.ceil(2 * llc / impl.nbytes))
    copies = min(copies, max(2, max_bytes // impl.nbytes))
    weights = [impl.weights] + [_clone(impl.weights) for _ in range(copies - 1)]
    for w in weights:  # every copy touched once, outside the timing
        impl.call(w)
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w in weights:
            impl.call(w)
        per_call.append((time.perf_counter() - t0) / copies * 1e6)
    per_call.sort()
    q = statistics.quantiles(per_call, n=5) if len(per_call) >= 2 else per_call * 4
    return {"device_us": statistics.median(per_call), "device_us_p20": q[0], "device_us_p80": q[-1]}, copies


COLUMNS = [("shape", "N x K"), ("impl", "impl"), ("dtype", "dtype"), ("copies", "copies"), ("device_us", "median us"),
           ("p20_p80", "p20-p80 us"), ("gbps", "GB/s"), ("pct_copy", "% copy"), ("vs_f32", "vs f32"),
           ("vs_int4", "vs torch-int4"), ("max_rel_err", "rel err"), ("check", "check")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Time M = 1 (decode) quantized GEMVs on the CPU with each call's weight read from memory "
                    "(rounds over copies of the weight larger than the last-level cache) and the code warm.",
        epilog="Shapes are N x K (out x in features). Speedups are over f32-linear and torch-int4 at the same shape, "
               "in this run. Rows are appended to the CSV with machine, date, commit and torch version.")
    p.add_argument("--shapes", type=size_pair, nargs="+", default=None, metavar="NxK",
                   help="weight shapes N x K (default 4096x4096 11008x4096)")
    p.add_argument("--rounds", type=positive_int, default=7, help="passes over all the copies (default 7)")
    p.add_argument("--max-gb", type=float, default=6.0, help="memory cap for one implementation's copies (default 6)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_cpu_decode.csv", help="CSV to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bnb = None
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - any import failure means no baseline
            logger.warning("no bitsandbytes rows: %s: %s", type(exc).__name__, exc)
    device = torch.device("cpu")
    tags = env_tags(device)
    busy = warn_if_busy(device)
    llc = _cpu_last_level_cache_bytes() or ASSUMED_LLC
    copy_bw = measure_copy_bandwidth(device, 1 << 28, iters=5)
    logger.info("%s, %d threads, last-level cache %d MiB, copy bandwidth %.1f GB/s", tags["card"],
                torch.get_num_threads(), llc >> 20, copy_bw / 1e9)
    extra = {"copy_gbps": round(copy_bw / 1e9, 2), "threads": torch.get_num_threads(), "llc_mib": llc >> 20,
             "others_busy": "" if busy is None else round(busy, 2), "bitsandbytes": getattr(bnb, "__version__", "none"),
             "isa": lightllm._native.cpp_module().bnb_cpu_isa() if lightllm._native.has_cpp() else "none"}
    rows = []
    with torch.no_grad():
        for n, k in args.shapes or SHAPES:
            wt = Weights(n, k, args.seed)
            shape_rows = []
            for impl in impls(wt, bnb):
                scope = lightllm.use_backend(impl.backend) if impl.backend else lightllm.use_backend("auto")
                with scope:
                    err, dense_err, ok = check(impl, impl.call(impl.weights))
                    if ok != "ok":
                        logger.error("%s %dx%d: %s (rel err %.3g, dense %.3g): not timed", impl.label, n, k, ok, err,
                                     dense_err)
                        timing, copies = {"device_us": float("nan"), "device_us_p20": float("nan"),
                                          "device_us_p80": float("nan")}, 0
                    else:
                        timing, copies = time_from_memory(impl, llc, args.rounds, int(args.max_gb * 2**30))
                gbps = impl.nbytes / (timing["device_us"] * 1e-6) / 1e9
                row = {"shape": f"{n}x{k}", "n": n, "k": k, "m": 1, "impl": impl.label,
                       "dtype": str(impl.dtype).removeprefix("torch."), "copies": copies, **timing,
                       "gbps": gbps, "pct_copy": 100 * gbps * 1e9 / copy_bw, "max_rel_err": err,
                       "ref_rel_err": dense_err, "check": ok, **extra}
                logger.info("%s %s %s: %.1f us", row["shape"], impl.label, row["dtype"], timing["device_us"])
                shape_rows.append(row)
                del impl
            f32 = next((r for r in shape_rows if r["impl"] == "f32-linear"), None)
            int4 = next((r for r in shape_rows if r["impl"] == "torch-int4"), None)
            for r in shape_rows:
                r["vs_f32"] = f32["device_us"] / r["device_us"] if f32 else None
                r["vs_int4"] = int4["device_us"] / r["device_us"] if int4 else None
            rows += shape_rows
    CsvWriter(args.out, tags).write(rows)
    for r in rows:
        r["p20_p80"] = f"{r['device_us_p20']:.0f}-{r['device_us_p80']:.0f}"
    print(f"{tags['card']}, {torch.get_num_threads()} threads, commit {tags['commit']}, {tags.get('date', '')}; "
          f"last-level cache {llc >> 20} MiB, copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(format_table(rows, COLUMNS))
    print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
