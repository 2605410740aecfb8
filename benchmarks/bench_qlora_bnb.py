#!/usr/bin/env python
"""Benchmark LoRA on bitsandbytes-style bases (NF4 / FP4 ``Linear4bit``, LLM.int8 ``Linear8bitLt``):
the fused ops (``lightllm::fourbit_lora_linear`` / ``int8_lora_linear``: the rank-r term in the
quantized GEMV's epilogue, the packed weight read once) against the unfused layer (the base layer's
forward, then the two adapter matmuls and an add: what LoraLinear ran on these bases before), in
the same run on the same device.

Rows, per base type, layer shape (in x out), token count and mode:

* ``base``: the quantized layer alone (the denominator of ``vs_base``);
* ``fused``: ``lightllm.tuning.LoraLinear`` on it (the fused op);
* ``unfused``: ``base(x) + scale * B(A(x))`` with the same float32 adapters;
* ``peft-bnb``: peft's LoRA on the real ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` (their CPU
  backend; only with ``--with-bnb``, and where they are installed).

The implementations of a case are timed in turn, one call each round (the last-level cache flushed
before each call), medians over ``--iters`` rounds. Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd`` (training: x and the adapters need
gradients, the base frozen; one forward and one backward per call). ``fused_vs_unfused`` is the
unfused time over the fused one. Each fused output is checked against the unfused one (float32, at
most 1e-4 of the output's largest value apart: "ok").

Examples:
    python benchmarks/bench_qlora_bnb.py --device cpu                      # 4096x4096, rank 16, M = 1 and 16, NF4
    python benchmarks/bench_qlora_bnb.py --device cpu --quant nf4 int8 --with-bnb
    python benchmarks/bench_qlora_bnb.py --device cpu --quick              # a tiny smoke run

Writes rows to benchmarks/results/bench_qlora_bnb.csv (appending; every row tagged with card, date,
commit) and prints a table. On a shared machine the CPU timings are noisy: the ``load1`` tag and the
busy warning say how busy it was.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    CsvWriter,
    Timing,
    bench_device,
    env_tags,
    fmt_float,
    format_table,
    positive_int,
    resolve_device,
    setup_logging,
    size_pair,
    warn_if_busy,
)

logger = logging.getLogger("benchmarks")


def make_base(quant: str, dense: nn.Linear, device: torch.device) -> nn.Module:
    from lightllm.nn import Linear4bit, Linear8bitLt

    if quant in ("nf4", "fp4"):
        return Linear4bit.from_linear(dense, quant_type=quant, compress_statistics=True).to(device)
    return Linear8bitLt.from_linear(dense, threshold=0.0).to(device)


def make_bnb_lora(quant: str, dense: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float, device):
    """peft's LoRA on bitsandbytes' own layer with the same weights and adapters, or None."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        return None
    if quant in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                  compute_dtype=torch.float32, quant_type=quant, compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type=quant,
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)
    model = peft.get_peft_model(nn.Sequential(layer), peft.LoraConfig(r=a.shape[0], lora_alpha=alpha,
                                                                         target_modules=["0"]))
    wrapped = model.base_model.model[0]
    with torch.no_grad():
        wrapped.lora_A["default"].weight.copy_(a)
        wrapped.lora_B["default"].weight.copy_(b)
    return wrapped


def run_case(quant: str, k: int, n: int, m: int, rank: int, mode: str, device, args, with_bnb: bool) -> list[dict]:
    from lightllm import tuning

    gen = torch.Generator().manual_seed(args.seed)
    dense = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        dense.bias.copy_(torch.randn(n, generator=gen) * 0.02)
    base = make_base(quant, dense, device)
    base.requires_grad_(False)
    layer = tuning.LoraLinear(base)
    layer.add_adapter("default", r=rank, alpha=2 * rank, init=False)
    a_mod, b_mod = layer.lora_A["default"], layer.lora_B["default"]
    scale = layer.scaling["default"]
    train = mode == "fwd+bwd"
    a_mod.requires_grad_(train)
    b_mod.requires_grad_(train)
    x = torch.randn(m, k, generator=gen).to(device).requires_grad_(train)
    grad = torch.randn(m, n, generator=gen).to(device)

    def unfused_forward(inp):
        return base(inp) + scale * b_mod(a_mod(inp))

    impls = {"base": base, "fused": layer, "unfused": unfused_forward}
    if with_bnb:
        theirs = make_bnb_lora(quant, dense, a_mod.weight.detach(), b_mod.weight.detach(), 2 * rank, device)
        if theirs is not None:
            theirs.requires_grad_(False)
            theirs.lora_A["default"].requires_grad_(train)
            theirs.lora_B["default"].requires_grad_(train)
            impls["peft-bnb"] = theirs

    def call(fn):
        if not train:
            def run():
                with torch.no_grad():
                    return fn(x)
        else:
            def run():
                y = fn(x)
                y.backward(grad)
                return y
        return run

    with torch.no_grad():
        fused_y, unfused_y = layer(x), unfused_forward(x)
    err = (fused_y - unfused_y).abs().max().item() / max(unfused_y.abs().max().item(), 1e-30)
    check = "ok" if err <= 1e-4 else f"FAIL ({err:.1e})"
    # Round robin: one timed call of each implementation in turn (each after a cache flush), so that
    # a change in the machine's load during the case hits every implementation alike.
    runs = {name: call(fn) for name, fn in impls.items()}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.iters):
        for name, run in runs.items():
            samples[name].append(bench_device(run, warmup=0, iters=1, device=device).median_us)
    rows = []
    times = {}
    for name in runs:
        t = Timing.from_samples(samples[name], "cpu wall" if device.type == "cpu" else "cuda events")
        times[name] = t.median_us
        rows.append(dict(quant=quant, shape=f"{k}x{n}", tokens=m, rank=rank, mode=mode, impl=name,
                         median_us=round(t.median_us, 1), p20_us=round(t.p20_us, 1), p80_us=round(t.p80_us, 1),
                         check=check if name == "fused" else ""))
    for row in rows:
        row["vs_base"] = round(row["median_us"] / times["base"], 3)
        row["fused_vs_unfused"] = round(times["unfused"] / times["fused"], 3) if row["impl"] == "fused" else ""
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quant", nargs="+", choices=("nf4", "fp4", "int8"), default=["nf4"])
    p.add_argument("--shapes", nargs="+", type=size_pair, default=[(4096, 4096)], help="in x out features")
    p.add_argument("--tokens", nargs="+", type=positive_int, default=[1, 16])
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--with-bnb", action="store_true", help="add peft on bitsandbytes' own layers (slow on the CPU)")
    p.add_argument("--iters", type=positive_int, default=30)
    p.add_argument("--warmup", type=positive_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's; 1 is steadier on a machine other processes load)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (256x192, few iterations)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_qlora_bnb.csv")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.quick:
        args.shapes, args.iters, args.warmup = [(256, 192)], 2, 1
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = warn_if_busy(device)
    rows = []
    for quant in args.quant:
        for k, n in args.shapes:
            for m in args.tokens:
                for mode in args.modes:
                    logger.info("%s %dx%d M=%d %s", quant, k, n, m, mode)
                    rows += run_case(quant, k, n, m, args.rank, mode, device, args, args.with_bnb)
    tags = env_tags(device)
    if busy is not None:
        tags["others_busy"] = f"{busy:.2f}"
    CsvWriter(args.out, tags).write(rows)
    print(format_table(rows, [("quant", "quant"), ("shape", "shape"), ("tokens", "M"), ("mode", "mode"),
                              ("impl", "impl"), ("median_us", "median us"), ("vs_base", "vs base"),
                              ("fused_vs_unfused", "unfused/fused"), ("check", "check")]))
    print(f"card: {tags['card']}, commit {tags['commit']}, load1 {tags['load1']}")
    return 0 if all(not str(r["check"]).startswith("FAIL") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
