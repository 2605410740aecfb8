#!/usr/bin/env python
"""Benchmark a LoRA layer: lightllm's fused LoRA against the plain Linear it wraps and PEFT.

For every layer shape (in x out features, as ``nn.Linear(in, out)``), every token count and every
mode, in the same run on the same device:

* ``linear``: the plain ``nn.Linear`` (cuBLAS), the denominator of every ratio;
* ``lightllm-<backend>``: ``lightllm.nn.LoraLinear`` with float32 adapters (PEFT's default), for
  each backend with its own kernel on the device (and the reference, ``lightllm-torch``);
* ``peft-fp32``: PEFT's LoRA layer with its default float32 adapters (it casts x to float32);
* ``peft-fp16``: PEFT's LoRA layer with adapters in the base's dtype (``autocast_adapter_dtype=False``);
* ``addmm``: the unfused version, ``y = x W^T + b`` then ``y.addmm_(x A^T, B^T)`` in the base's dtype.

Modes: ``fwd`` (inference, no autograd), ``fwd+bwd`` (training: x and the adapters need gradients,
the base weight is frozen; the baseline is the plain Linear with a frozen weight and x requiring
gradients: forward plus dX), and ``quant`` (a 4-bit GPTQ QuantLinear base: ``quant-linear`` is the
QuantLinear alone, ``lightllm-<backend>`` adds the adapter through the kernel's epilogue; inference).

Each output is checked against a float64 computation with the implementation's own weights; the
row fails ("FAIL") when its error is more than twice the plain Linear's in the same dtype. Each row
gives device time (CUDA events, L2 flushed before each call; CPU wall time on the CPU), eager time
per back-to-back call, the ratio to the baseline at the same shape, tokens and mode, the issue's
target for that case and whether it is met, the achieved bandwidth (bytes the layer must move:
weights, adapters, x and y) as a fraction of the copy bandwidth measured in the same run, and the
achieved TFLOP/s.

Examples:
    python benchmarks/bench_lora.py --quick                 # 2 shapes, 1/16/512/4096 tokens, ~3 min on an H100
    python benchmarks/bench_lora.py                         # the full sweep
    python benchmarks/bench_lora.py --shapes 4096x4096 --tokens 1 16 --modes fwd quant
    python benchmarks/bench_lora.py --device cpu            # tiny smoke run without a GPU

Writes rows to benchmarks/results/bench_lora.csv (appending; every row tagged with card, date,
commit), a plot of the ratio to the baseline against tokens next to it (.png), and prints a table.
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
    setup_logging,
    size_pair,
    time_capped,
)

import lightllm  # noqa: E402
from lightllm.backends import BACKENDS, why_unavailable  # noqa: E402
from lightllm.nn import LoraLinear, QuantLinear  # noqa: E402
from lightllm.ops import gptq as ops_gptq  # noqa: E402
from lightllm.ops import lora as ops_lora  # noqa: E402

logger = logging.getLogger("benchmarks.lora")

LINEAR, QUANT_LINEAR = "linear", "quant-linear"
OURS = "lightllm-"
PEFT_FP32, PEFT_FP16, ADDMM = "peft-fp32", "peft-fp16", "addmm"
MODES = ("fwd", "fwd+bwd", "quant")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# (in, out): LLaMA-7B's q/o, up/gate and down projections.
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
GPU_TOKENS = [1, 16, 512, 4096, 16384]
QUICK_SHAPES = [(4096, 4096), (4096, 11008)]
QUICK_TOKENS = [1, 16, 512, 4096]
CPU_SHAPES = [(96, 64)]
CPU_TOKENS = [1, 33]


def target(mode: str, tokens: int) -> str:
    """The issue's bar for a case, as text ('' where it sets none)."""
    if mode == "fwd":
        return "<= 1.08x" if tokens >= 4096 else "<= 1.15x" if tokens >= 512 else "<= 1.5x" if tokens <= 16 else ""
    if mode == "fwd+bwd":
        return "<= 1.15x" if tokens >= 4096 else ""
    if mode == "quant" and tokens == 1:
        return "<= +10% or +2 us"
    return ""


def target_met(mode: str, tokens: int, ratio: float, us: float, base_us: float) -> bool | None:
    bar = target(mode, tokens)
    if not bar:
        return None
    if mode == "quant":
        return us <= base_us + max(0.1 * base_us, 2.0)
    return ratio <= float(bar.split()[1].rstrip("x"))


@dataclass(frozen=True)
class Schedule:
    warmup: int
    iters: int
    eager_iters: int
    eager_repeats: int
    copy_bytes: int
    max_seconds: float


def schedule_for(device: torch.device, quick: bool) -> Schedule:
    if device.type == "cuda":
        return (Schedule(3, 20, 10, 3, 1 << 30, 1.0) if quick else Schedule(5, 50, 20, 5, 1 << 30, 3.0))
    return Schedule(1, 3, 1, 3, 1 << 28, 3.0)


# ---- the layer under test -------------------------------------------------------------------

@dataclass
class Case:
    """One call to time: ``call()`` runs it; ``check()`` returns (output, float64 expected output)."""

    call: Callable[[], object]
    check: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int  # what the layer must move
    flops: float


class Layer:
    """A random base ``nn.Linear(k, n)`` in ``dtype`` and rank-r adapters (B non-zero, as after training)."""

    def __init__(self, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device, seed: int):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.k, self.n, self.r, self.dtype, self.device = k, n, r, dtype, device
        self.weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
        self.bias = (torch.randn(n, generator=gen) / 10).to(dtype).to(device)
        self.a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device)  # float32, as PEFT keeps them
        self.b = (torch.randn(n, r, generator=gen) / r ** 0.5).to(device)
        self.scale = 2.0
        self._quant: QuantLinear | None = None

    def linear(self) -> nn.Linear:
        lin = nn.Linear(self.k, self.n, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(False)
        lin.bias.requires_grad_(False)
        return lin

    def quant(self) -> QuantLinear:
        if self._quant is None:
            with torch.no_grad():
                self._quant = QuantLinear.from_linear(self.linear(), 4, 128).to(self.device)
        return self._quant

    def exact(self, x, weight64, a, b, with_lora=True) -> torch.Tensor:
        y = x.double() @ weight64.t() + self.bias.double()
        if with_lora:
            y = y + self.scale * (x.double() @ a.double().t()) @ b.double().t()
        return y


def _peft_layer(layer: Layer, fp32_adapters: bool):
    import peft

    holder = nn.Module()
    holder.lin = layer.linear()
    model = peft.get_peft_model(holder, peft.LoraConfig(r=layer.r, lora_alpha=layer.scale * layer.r,
                                                        target_modules=["lin"]),
                                autocast_adapter_dtype=fp32_adapters)
    module = model.base_model.model.lin
    with torch.no_grad():
        module.lora_A["default"].weight.copy_(layer.a)
        module.lora_B["default"].weight.copy_(layer.b)
    return module, module.lora_A["default"].weight, module.lora_B["default"].weight


def build(impl: str, layer: Layer, mode: str, x: torch.Tensor, grad: torch.Tensor) -> Case:
    """The call of ``impl`` for ``mode`` on input x (``grad``: the output gradient in fwd+bwd)."""
    k, n, r, m = layer.k, layer.n, layer.r, x.shape[0]
    elem = x.element_size()
    a, b = layer.a, layer.b
    lora_bytes = (a.numel() + b.numel()) * 4
    with_lora = impl not in (LINEAR, QUANT_LINEAR)
    if mode == "quant":
        q = layer.quant()
        if impl == QUANT_LINEAR:
            module = q
        else:
            module = LoraLinear(q)
            module.add_adapter("default", r, layer.scale * r)
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        weight64 = q.dequantize(torch.float64)
        nbytes = q.qweight.nbytes + q.qzeros.nbytes + q.scales.nbytes + (lora_bytes if with_lora else 0)
    elif impl == LINEAR:
        module, weight64 = layer.linear(), layer.weight.double()
        nbytes = layer.weight.nbytes
    elif impl in (PEFT_FP32, PEFT_FP16):
        module, a, b = _peft_layer(layer, impl == PEFT_FP32)
        weight64 = layer.weight.double()
        nbytes = layer.weight.nbytes + (a.numel() + b.numel()) * a.element_size()
    elif impl == ADDMM:
        lin = layer.linear()
        a, b = layer.a.to(layer.dtype), layer.b.to(layer.dtype)
        scale = layer.scale

        def module(inp):
            y = F.linear(inp, lin.weight, lin.bias)
            return y.addmm_(inp @ a.t(), b.t(), alpha=scale)

        weight64 = layer.weight.double()
        nbytes = layer.weight.nbytes + (a.numel() + b.numel()) * elem
    else:  # ours
        module = LoraLinear(layer.linear())
        module.add_adapter("default", r, layer.scale * r)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        weight64 = layer.weight.double()
        nbytes = layer.weight.nbytes + lora_bytes
    nbytes += 2 * m * (k + n) * elem if mode == "fwd+bwd" else m * (k + n) * elem
    flops = 2.0 * m * n * k * (2 if mode == "fwd+bwd" else 1)

    def check():
        with torch.no_grad():
            y = module(x)
        return y, layer.exact(x, weight64, a, b, with_lora)

    if mode != "fwd+bwd":
        def call():
            with torch.no_grad():
                return module(x)
        return Case(call, check, nbytes, flops)

    xg = x.detach().requires_grad_()
    inputs = [xg] + ([a, b] if with_lora else [])
    for t in inputs[1:]:
        t.requires_grad_(True)

    def call():
        return torch.autograd.grad(module(xg), inputs, grad)

    return Case(call, check, nbytes, flops)


def impls_for(mode: str, device: torch.device, wanted: list[str] | None) -> list[tuple[str, str]]:
    """(impl name, backend) pairs for a mode; ours only for backends with their own kernel."""
    op = ops_gptq.MATMUL if mode == "quant" else ops_lora.LINEAR
    out = [] if mode == "quant" else [(LINEAR, "aten F.linear")]
    for backend in BACKENDS:
        if backend == "torch" or lightllm.backends.has_kernel(op, backend, device.type):
            # On a quantized base each backend is compared with its own QuantLinear alone.
            out += ([(QUANT_LINEAR, backend)] if mode == "quant" else []) + [(OURS + backend, backend)]
        else:
            logger.debug("no %s kernel for %s on %s (%s)", backend, op, device.type, why_unavailable(backend))
    if mode != "quant":
        try:
            import peft

            out += [(PEFT_FP32, f"peft {peft.__version__}"), (PEFT_FP16, f"peft {peft.__version__}")]
        except ImportError:
            logger.warning("peft is not importable: no peft rows")
        out.append((ADDMM, "aten addmm_"))
    return [(i, b) for i, b in out if not wanted or i in wanted or i in (LINEAR, QUANT_LINEAR)]


def path_of(impl: str, backend: str, mode: str, tokens: int, x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which code path of ours serves the forward (the CUDA backend's dense forward above 16 tokens
    is the reference; the backward kernels are Triton's or the reference)."""
    if not impl.startswith(OURS):
        return ""
    if backend == "torch":
        return "reference"
    if mode == "quant":
        one_launch = tokens <= (8 if backend == "cuda" else 16)  # the CUDA GEMV serves up to 8 rows
        return "GEMV with S in the kernel, one launch" if one_launch else "S first, then the GEMM"
    backward = ""
    if mode == "fwd+bwd":
        backward = " + fused backward" if backend == "triton" else " + reference backward"
    if tokens <= ops_lora.DECODE_ROWS:
        if backend == "cuda" and ops_lora.cuda_decode_fits(x, weight) is not None:
            return "reference (kernel declines)" + backward
        return "decode, one launch" + backward
    if backend == "cuda":
        return "reference above 16 tokens" + backward
    return "shrink + GEMM with epilogue" + backward


# ---- accuracy and timing --------------------------------------------------------------------

def accuracy(y: torch.Tensor, exact: torch.Tensor, base_err: float | None, dtype: torch.dtype) -> tuple[float, str]:
    scale = float(exact.abs().max()) or 1.0
    err = float((y.double() - exact).abs().max()) / scale
    if not math.isfinite(err):
        return err, "FAIL: non-finite"
    if base_err is None:
        return err, "ok"
    return err, "ok" if err <= 2 * max(base_err, torch.finfo(dtype).eps / 2) else "FAIL: > 2x linear"


def time_case(fn, sched: Schedule, device: torch.device) -> dict:
    return time_capped(fn, warmup=sched.warmup, iters=sched.iters, eager_iters=sched.eager_iters,
                       eager_repeats=sched.eager_repeats, max_seconds=sched.max_seconds, device=device)


def run_shape(k: int, n: int, args, sched: Schedule, device: torch.device, dtype: torch.dtype, copy_bw: float):
    layer = Layer(k, n, args.rank, dtype, device, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    rows = []
    for mode in args.modes:
        tokens_list = [t for t in args.tokens if mode != "quant" or t <= 16] or args.tokens[:1]
        for tokens in tokens_list:
            x = torch.randn(tokens, k, generator=gen).to(dtype).to(device)
            grad = torch.randn(tokens, n, generator=gen).to(dtype).to(device)
            base: dict = {}  # baseline (error, device us, eager us), per backend on a quantized base
            for impl, backend in impls_for(mode, device, args.impl):
                key = backend if mode == "quant" else None
                base_err, base_us, base_eager = base.get(key, (None, None, None))
                ours_or_quant = impl.startswith(OURS) or impl == QUANT_LINEAR
                scope = lightllm.use_backend(backend) if ours_or_quant else contextlib.nullcontext()
                try:
                    with scope:
                        case = build(impl, layer, mode, x, grad)
                        y, exact = case.check()  # also compiles / autotunes before anything is timed
                        err, verdict = accuracy(y, exact, base_err, dtype)
                        del y, exact
                        timing = time_case(case.call, sched, device)
                except Exception as exc:
                    logger.warning("%s %dx%d %s tokens=%d failed, no row: %s: %s", impl, k, n, mode, tokens,
                                   type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if impl in (LINEAR, QUANT_LINEAR):
                    base[key] = base_err, base_us, base_eager = err, timing["device_us"], timing["eager_us"]
                ratio = timing["device_us"] / base_us if base_us else None
                row = {"shape": f"{k}x{n}", "in": k, "out": n, "rank": args.rank, "tokens": tokens, "mode": mode,
                       "impl": impl, "backend": backend, "path": path_of(impl, backend, mode, tokens, x, layer.weight),
                       "dtype": str(dtype).removeprefix("torch."), **timing, "bytes": case.nbytes,
                       "gbps": case.nbytes / (timing["device_us"] * 1e-6) / 1e9,
                       "tflops": case.flops / (timing["device_us"] * 1e-6) / 1e12,
                       "ratio_vs_base": ratio, "eager_ratio_vs_base": timing["eager_us"] / base_eager if base_eager else None,
                       "max_rel_err": err, "accuracy": verdict}
                row["frac_copy_bw"] = row["gbps"] * 1e9 / copy_bw
                if impl.startswith(OURS) and ratio is not None:
                    row["target"] = target(mode, tokens)
                    met = target_met(mode, tokens, ratio, timing["device_us"], base_us)
                    row["met"] = "" if met is None else ("yes" if met else "NO")
                (logger.warning if verdict != "ok" else logger.info)(
                    "%-15s %-7s %dx%d tokens=%-5d %9.1f us (eager %.1f)  x%.3f  err %.2g %s", impl, mode, k, n,
                    tokens, timing["device_us"], timing["eager_us"], ratio or float("nan"), err, verdict)
                rows.append(row)
                del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---- plot -----------------------------------------------------------------------------------

def plot_ratios(rows: list[dict], path: Path, tags: dict) -> None:
    """Device time over the baseline against tokens: one panel per (shape, mode), one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] not in (LINEAR, QUANT_LINEAR)))
    if not panels or not impls:
        logger.warning("nothing to plot")
        return
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols + 2.0, 3.8 * nrows), squeeze=False)
    colours = {i: plt.get_cmap("tab10")(j % 10) for j, i in enumerate(impls)}
    for ax, (shape, mode) in zip(axes.flat, panels):
        for impl in impls:
            pts = sorted((r["tokens"], r["ratio_vs_base"]) for r in rows
                         if r["shape"] == shape and r["mode"] == mode and r["impl"] == impl and r["ratio_vs_base"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colours[impl],
                        label=impl)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{shape} (in x out), {mode}", fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("device time / baseline")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            if lbl not in labels:
                handles.append(h)
                labels.append(lbl)
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"LoRA layer, rank {rows[0]['rank']}, {rows[0]['dtype']} (baseline: the plain layer)\n"
                 f"{tags.get('card', '?')}, {tags.get('date', '?')[:10]}, commit {tags.get('commit', '?')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (5.0 * cols + 2.0), 1))
    save_figure(fig, path)


# ---- CLI ------------------------------------------------------------------------------------

IMPL_CHOICES = (LINEAR, QUANT_LINEAR, *(OURS + b for b in BACKENDS), PEFT_FP32, PEFT_FP16, ADDMM)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time lightllm's fused LoRA layer (every backend with a kernel on the device) against the plain "
                    "Linear, PEFT's LoRA (fp32 and fp16 adapters) and an unfused addmm version, forward, "
                    "forward+backward and on a 4-bit GPTQ base, after checking each output against float64.",
        epilog="Shapes are IN x OUT (nn.Linear(in, out)). Defaults on a GPU: shapes "
               + " ".join(f"{k}x{n}" for k, n in GPU_SHAPES) + ", tokens " + " ".join(map(str, GPU_TOKENS))
               + ", rank 16, float16. The quant mode runs at up to 16 tokens. On the CPU a tiny smoke run (set "
               "TRITON_INTERPRET=1 to include Triton). Rows are appended to the CSV (tagged with card, date and "
               "commit); the plot goes next to it.",
    )
    p.add_argument("--quick", action="store_true",
                   help="GPU: shapes " + " ".join(f"{k}x{n}" for k, n in QUICK_SHAPES) + ", tokens "
                        + " ".join(map(str, QUICK_TOKENS)) + ", fewer iterations")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--shapes", type=size_pair, nargs="+", default=None, metavar="INxOUT")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=None, metavar="T", help="rows of x, e.g. 1 16 4096")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: all)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="the base layer's dtype")
    p.add_argument("--impl", nargs="+", choices=IMPL_CHOICES, default=None, metavar="IMPL",
                   help="only these implementations: " + ", ".join(IMPL_CHOICES) + " (the baseline always runs)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per case (overrides the schedule)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (overrides the schedule)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and inputs")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_lora.csv",
                   help="CSV to append to (default benchmarks/results/bench_lora.csv); the plot goes next to it")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


COLUMNS = [
    ("shape", "in x out"), ("mode", "mode"), ("tokens", "tokens"), ("impl", "impl"), ("path", "path"),
    ("device_us", "median us"), ("p20_p80", "p20-p80 us"), ("eager_us", "eager us"),
    ("ratio_vs_base", "x baseline"), ("target", "target"), ("met", "met"), ("gbps", "GB/s"), ("pct_copy", "% copy"),
    ("tflops", "TFLOP/s"), ("max_rel_err", "max rel err"), ("accuracy", "check"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    sched = schedule_for(device, args.quick)
    sched = Schedule(sched.warmup if args.warmup is None else args.warmup,
                     sched.iters if args.iters is None else args.iters, sched.eager_iters, sched.eager_repeats,
                     sched.copy_bytes, sched.max_seconds)
    if device.type == "cuda":
        shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES)
        args.tokens = sorted(args.tokens or (QUICK_TOKENS if args.quick else GPU_TOKENS))
    else:
        shapes, args.tokens = args.shapes or CPU_SHAPES, sorted(args.tokens or CPU_TOKENS)
    dtype = DTYPES[args.dtype]
    tags = env_tags(device)
    logger.info("device %s (%s), shapes %s, tokens %s, rank %d, commit %s", device, tags["card"],
                " ".join(f"{k}x{n}" for k, n in shapes), args.tokens, args.rank, tags["commit"])
    copy_bw = measure_copy_bandwidth(device, sched.copy_bytes)
    logger.info("copy bandwidth (read + write): %.1f GB/s", copy_bw / 1e9)
    rows = []
    for k, n in shapes:
        rows += run_shape(k, n, args, sched, device, dtype, copy_bw)
    if not rows:
        raise SystemExit("no case ran; see the log")
    for r in rows:
        r["copy_gbps"] = copy_bw / 1e9
        r["device"] = device.type
    CsvWriter(args.out, tags).write(rows)
    plot_ratios(rows, args.out.with_suffix(".png"), tags)
    for r in rows:
        r["p20_p80"] = f"{fmt_float(r['device_us_p20'])}-{fmt_float(r['device_us_p80'])}"
        r["pct_copy"] = 100 * r["frac_copy_bw"]
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | torch {tags['torch']} | "
          f"triton {tags['triton']} | timing: {rows[0]['method']} | copy bandwidth {copy_bw / 1e9:.1f} GB/s | "
          f"rank {args.rank} | {args.dtype}")
    print(format_table(rows, COLUMNS))
    if device.type == "cpu":
        print("\nCPU run: a smoke test of the script; the times mean nothing for the GPU targets.")
    missed = [r for r in rows if r.get("met") == "NO"]
    if missed:
        print(f"\n{len(missed)} row(s) miss their target (column 'met').")
    failed = [r for r in rows if r["accuracy"] != "ok"]
    if failed:
        print(f"\n{len(failed)} row(s) fail the accuracy bar (column 'check').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
