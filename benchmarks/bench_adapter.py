#!/usr/bin/env python
"""Benchmark a bottleneck adapter: lightllm's fused adapter against the frozen layer alone and an
eager PyTorch adapter.

The adapter sits on the layer's output (``y = o + s * up(act(down(o)))``, o = the frozen Linear's
output: Houlsby's placement and LLM-Adapters' output adapter). For every layer shape (in x out),
bottleneck size, token count and mode, in the same run on the same device:

* ``linear``: the frozen ``nn.Linear`` alone (cuBLAS), the denominator of every ratio;
* ``lightllm-<backend>``: ``lightllm.nn.AdapterLayer`` with float32 adapters (as LLM-Adapters keeps
  them), for each backend with its own kernel on the device, and the reference ``lightllm-torch``;
* ``eager-fp32``: the adapter as LLM-Adapters computes it in eager PyTorch: o cast to float32, three
  modules (down, tanh, up), the scaling, the residual add, and the cast back;
* ``eager-half``: the same with the adapter in the base's dtype (no casts; less accurate).

Modes: ``fwd`` (inference) and ``fwd+bwd`` (training: x and the adapter need gradients, the base
weight is frozen; the baseline is the frozen Linear's forward plus dX).

Each output (forward) or input gradient (forward+backward) is checked against float64 with the
implementation's own weights; the row fails when its error is more than twice the plain Linear's in
the same dtype (``eager-half`` is reported, not judged). Columns: device time (CUDA events, L2 flushed), eager time per back-to-back call, the ratio
to the baseline, the issue's target and whether it is met, the bandwidth achieved on the bytes the
layer must move (weights, adapter, x, y) as a fraction of the copy bandwidth measured in the same
run, TFLOP/s, and ``floor``: 1 + the adapter's FLOPs over the baseline's, the best ratio possible
at equal efficiency where the layer is compute-bound (large token counts).

Examples:
    python benchmarks/bench_adapter.py --quick          # 2 shapes, bottleneck 64 and 256, 1/16/512/4096 tokens
    python benchmarks/bench_adapter.py                  # the full sweep
    python benchmarks/bench_adapter.py --shapes 4096x4096 --bottleneck 64 --tokens 1 --modes fwd
    python benchmarks/bench_adapter.py --device cpu     # tiny smoke run without a GPU

Writes rows to benchmarks/results/bench_adapter.csv (appending; every row tagged with card, date,
commit), a plot of the ratio to the baseline against tokens next to it (.png), and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    env_tags,
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
from lightllm.nn import AdapterLayer  # noqa: E402
from lightllm.ops import adapter as ops_adapter  # noqa: E402

logger = logging.getLogger("benchmarks.adapter")

LINEAR, OURS, EAGER_FP32, EAGER_HALF = "linear", "lightllm-", "eager-fp32", "eager-half"
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ACT = "tanh"  # LLM-Adapters' default

# (in, out): LLaMA-7B's attention output (o_proj) and FFN output (down_proj), where adapters sit.
GPU_SHAPES = [(4096, 4096), (11008, 4096)]
GPU_TOKENS = [1, 16, 512, 4096, 16384]
GPU_BOTTLENECKS = [64, 256]
QUICK_TOKENS = [1, 16, 512, 4096]
CPU_SHAPES = [(96, 64)]
CPU_TOKENS = [1, 33]
CPU_BOTTLENECKS = [8]


def target(mode: str, tokens: int, out_features: int) -> str:
    """The issue's bar for a case ('' where it sets none)."""
    if mode == "fwd" and tokens == 1 and out_features == 4096:
        return "<= 1.20x"
    if mode == "fwd+bwd" and tokens == 4096:
        return "<= 1.15x"
    return ""


class Layer:
    """A random frozen ``nn.Linear(k, n)`` in ``dtype`` and a trained-looking adapter on its output."""

    def __init__(self, k, n, b, dtype, device, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.k, self.n, self.b, self.dtype, self.device = k, n, b, dtype, device
        self.weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
        self.bias = (torch.randn(n, generator=gen) / 10).to(dtype).to(device)
        self.wd = (torch.randn(b, n, generator=gen) / n ** 0.5).to(device)  # float32, as LLM-Adapters keeps them
        self.wu = (torch.randn(n, b, generator=gen) / b ** 0.5 / 4).to(device)
        self.scale = 1.0

    def linear(self) -> nn.Linear:
        lin = nn.Linear(self.k, self.n, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def exact(self, x, wd, wu, with_adapter=True) -> torch.Tensor:
        o = x.to(torch.float64) @ self.weight.double().t() + self.bias.double()
        if not with_adapter:
            return o
        return o + self.scale * torch.tanh(o @ wd.double().t()) @ wu.double().t()


class EagerAdapter(nn.Module):
    """LLM-Adapters' output adapter in eager PyTorch (fp32: its casts; half: none)."""

    def __init__(self, layer: Layer, fp32: bool):
        super().__init__()
        self.lin = layer.linear()
        dtype = torch.float32 if fp32 else layer.dtype
        self.down = nn.Linear(layer.n, layer.b, bias=False, device=layer.device, dtype=dtype)
        self.up = nn.Linear(layer.b, layer.n, bias=False, device=layer.device, dtype=dtype)
        with torch.no_grad():
            self.down.weight.copy_(layer.wd)
            self.up.weight.copy_(layer.wu)
        self.fp32, self.scale = fp32, layer.scale

    def forward(self, x):
        o = self.lin(x)
        z = o.float() if self.fp32 else o
        return (self.up(torch.tanh(self.down(z))).to(o.dtype) * self.scale) + o


def build(impl: str, layer: Layer, mode: str, x: torch.Tensor, grad: torch.Tensor):
    """(call, check, bytes, flops, adapter weights) of ``impl`` for ``mode`` on input x."""
    k, n, b, m = layer.k, layer.n, layer.b, x.shape[0]
    elem = x.element_size()
    adapter_bytes = 2 * n * b * 4
    if impl == LINEAR:
        module, params = layer.linear(), []
        wd = wu = None
        nbytes = layer.weight.nbytes
    elif impl in (EAGER_FP32, EAGER_HALF):
        module = EagerAdapter(layer, impl == EAGER_FP32)
        wd, wu = module.down.weight, module.up.weight
        params = [wd, wu]
        nbytes = layer.weight.nbytes + 2 * n * b * wd.element_size()
    else:
        module = AdapterLayer(layer.linear())
        module.add_adapter("default", "output", b, ACT, layer.scale)
        with torch.no_grad():
            module.adapter_down["default"].weight.copy_(layer.wd)
            module.adapter_up["default"].weight.copy_(layer.wu)
        wd, wu = module.adapter_down["default"].weight, module.adapter_up["default"].weight
        params = [wd, wu]
        nbytes = layer.weight.nbytes + adapter_bytes
    nbytes += (2 if mode == "fwd+bwd" else 1) * m * (k + n) * elem
    flops = 2.0 * m * n * k * (2 if mode == "fwd+bwd" else 1)

    def check():
        """(output, float64 output) in fwd; in fwd+bwd the input gradients, which cover the backward."""
        if mode == "fwd":
            with torch.no_grad():
                y = module(x)
            return y, layer.exact(x, wd, wu, impl != LINEAR)
        xg = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(module(xg), [xg], grad)
        x64 = x.detach().double().requires_grad_()
        (ex,) = torch.autograd.grad(layer.exact(x64, wd.detach() if wd is not None else None,
                                                wu.detach() if wu is not None else None, impl != LINEAR),
                                    [x64], grad.double())
        return gx, ex

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return module(x)
        return call, check, nbytes, flops

    xg = x.detach().requires_grad_()
    inputs = [xg] + params
    for p in params:
        p.requires_grad_(True)

    def call():
        return torch.autograd.grad(module(xg), inputs, grad)

    return call, check, nbytes, flops


def floor_ratio(mode: str, m: int, k: int, n: int, b: int) -> float:
    """1 + adapter FLOPs / baseline FLOPs: forward 2 GEMMs of n x b (vs the layer's k x n); training
    adds dh, dz, dWd, dWu (4 more) against the layer's dX (1 more)."""
    base = (1 if mode == "fwd" else 2) * 2.0 * m * k * n
    adapter = (2 if mode == "fwd" else 6) * 2.0 * m * n * b
    return 1 + adapter / base


def impls(device: torch.device, wanted: list[str] | None) -> list[tuple[str, str]]:
    out = [(LINEAR, "aten F.linear")]
    for backend in BACKENDS:
        if backend == "torch" or lightllm.backends.has_kernel(ops_adapter.ADAPTER, backend, device.type):
            out.append((OURS + backend, backend))
        else:
            logger.debug("no %s kernel on %s (%s)", backend, device.type, why_unavailable(backend))
    out += [(EAGER_FP32, "eager PyTorch"), (EAGER_HALF, "eager PyTorch")]
    return [(i, be) for i, be in out if not wanted or i in wanted or i == LINEAR]


def path_of(impl: str, backend: str, tokens: int) -> str:
    if not impl.startswith(OURS):
        return ""
    if backend == "torch":
        return "reference"
    return "one launch" if tokens <= ops_adapter.DECODE_ROWS else "skinny down + GEMM with act/residual"


def run(args, device, dtype, copy_bw, sched) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    for k, n in args.shapes:
        for b in args.bottleneck:
            layer = Layer(k, n, b, dtype, device, args.seed)
            for mode in args.modes:
                for tokens in args.tokens:
                    x = torch.randn(tokens, k, generator=gen).to(dtype).to(device)
                    grad = torch.randn(tokens, n, generator=gen).to(dtype).to(device)
                    base_err = base_us = base_eager = None
                    for impl, backend in impls(device, args.impl):
                        scope = lightllm.use_backend(backend) if impl.startswith(OURS) else contextlib.nullcontext()
                        try:
                            with scope:
                                call, check, nbytes, flops = build(impl, layer, mode, x, grad)
                                y, exact = check()  # also compiles / autotunes before anything is timed
                                scale = float(exact.abs().max()) or 1.0
                                err = float((y.double() - exact).abs().max()) / scale
                                del y, exact
                                timing = time_capped(call, warmup=sched[0], iters=sched[1], eager_iters=sched[2],
                                                     eager_repeats=3, max_seconds=sched[3], device=device)
                        except Exception as exc:
                            logger.warning("%s %dx%d b=%d %s tokens=%d failed, no row: %s: %s", impl, k, n, b, mode,
                                           tokens, type(exc).__name__, exc)
                            continue
                        if impl == LINEAR:
                            base_err, base_us, base_eager = err, timing["device_us"], timing["eager_us"]
                        verdict = "ok" if math.isfinite(err) else "FAIL: non-finite"
                        if verdict == "ok" and impl != EAGER_HALF and base_err is not None and \
                                err > 2 * max(base_err, torch.finfo(dtype).eps / 2):
                            verdict = "FAIL: > 2x linear"
                        ratio = timing["device_us"] / base_us if base_us else None
                        row = {"shape": f"{k}x{n}", "in": k, "out": n, "bottleneck": b, "tokens": tokens, "mode": mode,
                               "impl": impl, "backend": backend, "path": path_of(impl, backend, tokens),
                               "dtype": str(dtype).removeprefix("torch."), **timing, "bytes": nbytes,
                               "gbps": nbytes / (timing["device_us"] * 1e-6) / 1e9,
                               "tflops": flops / (timing["device_us"] * 1e-6) / 1e12,
                               "ratio_vs_base": ratio,
                               "eager_ratio_vs_base": timing["eager_us"] / base_eager if base_eager else None,
                               "floor": floor_ratio(mode, tokens, k, n, b), "max_rel_err": err, "accuracy": verdict}
                        row["frac_copy_bw"] = row["gbps"] * 1e9 / copy_bw
                        if impl.startswith(OURS) and ratio is not None:
                            row["target"] = target(mode, tokens, n)
                            if row["target"]:
                                row["met"] = "yes" if ratio <= float(row["target"].split()[1].rstrip("x")) else "NO"
                        rows.append(row)
                        logger.info("%-15s %-7s %dx%d b=%-4d tokens=%-5d %9.1f us x%.3f err %.2g %s", impl, mode, k, n, b,
                                    tokens, timing["device_us"], ratio or float("nan"), err, verdict)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path, tags: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["bottleneck"], r["mode"]) for r in rows))
    names = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != LINEAR))
    if not panels or not names:
        logger.warning("nothing to plot")
        return
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols + 2, 3.6 * nrows), squeeze=False)
    colours = {i: plt.get_cmap("tab10")(j % 10) for j, i in enumerate(names)}
    for ax, (shape, b, mode) in zip(axes.flat, panels):
        for impl in names:
            pts = sorted((r["tokens"], r["ratio_vs_base"]) for r in rows if (r["shape"], r["bottleneck"], r["mode"],
                                                                             r["impl"]) == (shape, b, mode, impl)
                         and r["ratio_vs_base"])
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=4, color=colours[impl], label=impl)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{shape}, bottleneck {b}, {mode}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / frozen Linear")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"Bottleneck adapter on a Linear's output, {rows[0]['dtype']} (baseline: the frozen Linear)\n"
                 f"{tags.get('card', '?')}, {tags.get('date', '?')[:10]}, commit {tags.get('commit', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2 / (4.5 * cols + 2), 1))
    save_figure(fig, path)


IMPL_CHOICES = (LINEAR, *(OURS + b for b in BACKENDS), EAGER_FP32, EAGER_HALF)
COLUMNS = [
    ("shape", "in x out"), ("bottleneck", "b"), ("mode", "mode"), ("tokens", "tokens"), ("impl", "impl"),
    ("path", "path"), ("device_us", "median us"), ("eager_us", "eager us"), ("ratio_vs_base", "x baseline"),
    ("floor", "floor"), ("target", "target"), ("met", "met"), ("gbps", "GB/s"), ("pct_copy", "% copy"),
    ("tflops", "TFLOP/s"), ("max_rel_err", "max rel err"), ("accuracy", "check"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time lightllm's fused bottleneck adapter (every backend with a kernel on the device) on a Linear's "
                    "output against the frozen Linear alone and eager PyTorch adapters, forward and "
                    "forward+backward, after checking each output against float64.",
        epilog="Shapes are IN x OUT (nn.Linear(in, out)). Defaults on a GPU: shapes "
               + " ".join(f"{k}x{n}" for k, n in GPU_SHAPES) + ", bottleneck " + " ".join(map(str, GPU_BOTTLENECKS))
               + ", tokens " + " ".join(map(str, GPU_TOKENS)) + ", float16. On the CPU a tiny smoke run (set "
               "TRITON_INTERPRET=1 to include Triton). Rows are appended to the CSV (tagged with card, date and "
               "commit); the plot goes next to it.")
    p.add_argument("--quick", action="store_true", help="GPU: tokens " + " ".join(map(str, QUICK_TOKENS))
                   + ", fewer iterations")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--shapes", type=size_pair, nargs="+", default=None, metavar="INxOUT")
    p.add_argument("--bottleneck", type=positive_int, nargs="+", default=None, metavar="B",
                   help="adapter bottleneck sizes (default 64 256 on a GPU)")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=None, metavar="T", help="rows of x")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: both)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="the base layer's dtype")
    p.add_argument("--impl", nargs="+", choices=IMPL_CHOICES, default=None, metavar="IMPL",
                   help="only these implementations: " + ", ".join(IMPL_CHOICES) + " (the baseline always runs)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per case")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and inputs")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_adapter.csv",
                   help="CSV to append to (default benchmarks/results/bench_adapter.csv); the plot goes next to it")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    if device.type == "cuda":
        sched = (3, 20, 10, 1.0) if args.quick else (5, 50, 20, 3.0)
        args.shapes = args.shapes or GPU_SHAPES
        args.bottleneck = args.bottleneck or GPU_BOTTLENECKS
        args.tokens = sorted(args.tokens or (QUICK_TOKENS if args.quick else GPU_TOKENS))
    else:
        sched = (1, 3, 1, 3.0)
        args.shapes, args.bottleneck = args.shapes or CPU_SHAPES, args.bottleneck or CPU_BOTTLENECKS
        args.tokens = sorted(args.tokens or CPU_TOKENS)
    sched = (sched[0] if args.warmup is None else args.warmup, args.iters or sched[1], sched[2], sched[3])
    dtype = DTYPES[args.dtype]
    tags = env_tags(device)
    copy_bw = measure_copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    logger.info("device %s (%s), copy bandwidth %.1f GB/s, commit %s", device, tags["card"], copy_bw / 1e9,
                tags["commit"])
    rows = run(args, device, dtype, copy_bw, sched)
    if not rows:
        raise SystemExit("no case ran; see the log")
    for r in rows:
        r["copy_gbps"] = copy_bw / 1e9
        r["device"] = device.type
    CsvWriter(args.out, tags).write(rows)
    plot(rows, args.out.with_suffix(".png"), tags)
    for r in rows:
        r["pct_copy"] = 100 * r["frac_copy_bw"]
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | torch {tags['torch']} | triton {tags['triton']}"
          f" | timing: {rows[0]['method']} | copy bandwidth {copy_bw / 1e9:.1f} GB/s | {args.dtype} | act {ACT}")
    print(format_table(rows, COLUMNS))
    if device.type == "cpu":
        print("\nCPU run: a smoke test of the script; the times mean nothing for the GPU targets.")
    missed = [r for r in rows if r.get("met") == "NO"]
    if missed:
        print(f"\n{len(missed)} row(s) miss their target (column 'met'); 'floor' is the best ratio possible at equal "
              "efficiency where the layer is compute-bound.")
    failed = [r for r in rows if r["accuracy"] != "ok"]
    if failed:
        print(f"\n{len(failed)} row(s) fail the accuracy bar (column 'check').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
