"""GPTQ solve time for one layer: the plain PyTorch loop against the fused Triton block kernel.

Both are timed warm (one untimed call first), on the same Hessian (2 X X^T / n of correlated random
activations, 128 x 2048 tokens by default) and weight, and their reconstruction errors
(||X (W - Q)^T||^2 / n over the calibration tokens) are compared: the fused solve must match the plain
one within 1%.

  python benchmarks/bench_gptq_solver.py                    # GPU: 4096x4096 and 4096x11008 (N x K)
  python benchmarks/bench_gptq_solver.py --device cpu       # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from lightllm.quantization import gptq_solve  # noqa: E402
from lightllm.quantization.gptq.solver import _triton_solver  # noqa: E402

logger = logging.getLogger("benchmarks.gptq_solver")


def hessian_of(tokens: int, k: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, a sample of the activations): H from ``tokens`` correlated activations, in chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(k, k, device=device, generator=g) / k**0.5
    h = torch.zeros(k, k, device=device)
    sample = None
    for start in range(0, tokens, 8192):
        n = min(8192, tokens - start)
        x = torch.randn(n, k, device=device, generator=g) @ mix
        x[:, ::64] *= 8  # a few outlier features, as in real LLM activations
        h.addmm_(x.t(), x, alpha=2.0 / tokens)
        sample = x if sample is None else sample
    return h, sample


def timed(fn, device) -> tuple[float, object]:
    _timing.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    _timing.synchronize(device)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxK",
                        help="layer shapes, out x in (default 4096x4096 4096x11008; 64x256 on the CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 128 x 2048)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--quick", action="store_true", help="accepted for device_check.sh; same work")
    parser.add_argument("--out", default=str(_timing.RESULTS_DIR / "bench_gptq_solver.csv"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _timing.setup_logging(args.verbose)
    device = _timing.resolve_device(args.device)
    cpu = device.type == "cpu"
    shapes = args.shapes or (["64x256"] if cpu else ["4096x4096", "4096x11008"])
    tokens = args.tokens or (2048 if cpu else 128 * 2048)
    fused_ok = _triton_solver() is not None and (not cpu or os.environ.get("TRITON_INTERPRET") == "1")

    rows = []
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        h, x = hessian_of(tokens, k, device)
        w = torch.randn(n, k, device=device, generator=torch.Generator(device=device).manual_seed(1)) * 0.02
        variants = [("plain PyTorch", False)] + ([("fused Triton", True)] if fused_ok else [])
        results = {}
        for name, fused in variants:
            def solve(fused=fused):
                return gptq_solve(w, h, args.bits, args.group_size, act_order=args.act_order, fused=fused)
            timed(solve, device)  # warm-up: kernels compiled, cuBLAS/cuSOLVER handles created
            seconds, result = timed(solve, device)
            error = float(((x @ (w - result.dequantize()).t()) ** 2).mean())
            results[name] = (seconds, error)
            logger.info("%s %s: %.3f s, reconstruction error %.6g", shape, name, seconds, error)
        plain_s, plain_err = results["plain PyTorch"]
        for name, (seconds, error) in results.items():
            rows.append(dict(shape=shape, impl=name, tokens=tokens, bits=args.bits, group_size=args.group_size,
                             act_order=args.act_order, seconds=seconds, speedup=plain_s / seconds,
                             recon_error=error, error_vs_plain=error / plain_err - 1))
    tags = _timing.env_tags(device)
    _timing.CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags.get('card', device)} | {tags.get('date')} | commit {tags.get('commit')} | {tokens} tokens, "
          f"{args.bits}-bit g{args.group_size}{' act-order' if args.act_order else ''}, warm")
    print(_timing.format_table(rows, [("shape", "N x K"), ("impl", "solver"), ("seconds", "seconds"),
                                      ("speedup", "vs plain"), ("error_vs_plain", "error vs plain")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
