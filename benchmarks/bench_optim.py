"""Optimizer step time: lightllm's AdamW8bit against torch AdamW (foreach, fused) and bitsandbytes.

Problems (float32 parameters and gradients unless --dtype):
  134m   8 tensors of 4096 x 4096 (134M parameters)           GPU default
  llama  the parameter list of one LLaMA-7B decoder layer (q, k, v, o 4096^2; gate, up 11008 x 4096;
         down 4096 x 11008; two RMSNorm weights of 4096)     GPU default
  16m    4 tensors of 4096 x 1024 (16.8M parameters)           CPU default

Each row: the median step time (CUDA events on a GPU, wall clock on the CPU), the eager time per
step, the ratio to torch's fused AdamW measured in the same run, the bytes of optimizer state per
parameter, and the achieved bandwidth (bytes the step must move: 16.06 per fp32 parameter for
8-bit Adam, 10.06 with bf16 parameters and gradients; 28 and 14 for 32-bit Adam) against the copy
bandwidth measured in the run.

  python benchmarks/bench_optim.py                       # GPU: 134m and llama
  python benchmarks/bench_optim.py --device cpu          # CPU: 16m
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

import lightllm  # noqa: E402
from lightllm import backends  # noqa: E402
from lightllm.optim import AdamW8bit  # noqa: E402

logger = logging.getLogger("benchmarks.optim")

PROBLEMS = {
    "134m": [(4096, 4096)] * 8,
    "llama": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)] + [(4096,)] * 2,
    "16m": [(4096, 1024)] * 4,
    "tiny": [(256, 256), (300,)],
}


def traffic_bytes(n_params: int, eight_bit: bool, dtype: torch.dtype) -> float:
    """Bytes one Adam step must read and write: param r/w + grad read + the two states r/w."""
    elem = torch.tensor([], dtype=dtype).element_size()
    state = (2 * 1 + 2 * 4 / 256) * 2 if eight_bit else 2 * 4 * 2  # (m, v) read + written
    return n_params * (3 * elem + state)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in ("step", "qmap1", "qmap2"):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):  # bitsandbytes nests nothing at run time, but be safe
                total += sum(v.numel() * v.element_size() for k, v in value.items()
                             if isinstance(v, torch.Tensor) and k not in ("qmap1", "qmap2"))
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="parameter and gradient dtype (default float32)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 50 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--out", default=str(_timing.RESULTS_DIR / "bench_optim.csv"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _timing.setup_logging(args.verbose)
    device = _timing.resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    problems = args.problems or (["134m", "llama"] if device.type == "cuda" else ["16m"])
    iters = args.iters or ((10 if args.quick else 50) if device.type == "cuda" else (3 if args.quick else 10))
    copy_bw = _timing.measure_copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28))
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        logger.info("bitsandbytes not importable: its rows are skipped")

    candidates = [
        ("torch AdamW foreach", "-", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), False),
        ("torch AdamW fused", "-", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), False),
    ]
    if bnb is not None:
        candidates += [("bnb AdamW8bit", "-", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4), True),
                       ("bnb AdamW 32-bit", "-", lambda ps: bnb.optim.AdamW(ps, lr=1e-4, optim_bits=32), False)]
    for backend in lightllm.available_backends():
        if not backends.has_kernel("optimizer_step", backend, device.type) or backend == "torch":
            continue
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is not a speed
        candidates.append(("lightllm AdamW8bit", backend, lambda ps: AdamW8bit(ps, lr=1e-4), True))
        candidates.append(("lightllm AdamW 32-bit", backend, lambda ps: AdamW8bit(ps, lr=1e-4, optim_bits=32), False))

    rows = []
    for problem in problems:
        shapes = PROBLEMS[problem]
        n_params = sum(torch.Size(s).numel() for s in shapes)
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype) * 0.02) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, device=device, generator=gen) * 1e-3).to(dtype)
        fused_time = None
        for name, backend, make, eight in candidates:
            try:
                opt = make(params)
                ctx = lightllm.use_backend(backend) if backend != "-" else torch.no_grad()
                with ctx:
                    timing = _timing.bench_device(opt.step, warmup=args.warmup, iters=iters, flush_l2=False,
                                                  device=device)
                    eager = _timing.bench_eager(opt.step, warmup=1, iters=max(1, iters // 5), repeats=3,
                                                device=device)
            except Exception as exc:  # e.g. a fused kernel this torch lacks for the device or dtype
                logger.warning("%s (%s) on %s: %s: %s", name, backend, problem, type(exc).__name__, exc)
                continue
            seconds = timing.median_us / 1e6
            if name == "torch AdamW fused":
                fused_time = seconds
            moved = traffic_bytes(n_params, eight, dtype)
            rows.append(dict(problem=problem, impl=name, backend=backend, dtype=args.dtype, params=n_params,
                             step_ms=seconds * 1e3, eager_ms=eager.median_us / 1e3, vs_torch_fused=float("nan"),
                             state_bytes_per_param=state_bytes(opt) / n_params,
                             gbps=moved / seconds / 1e9, pct_copy_bw=100 * moved / seconds / copy_bw))
            logger.info("%s %s (%s): %.3f ms", problem, name, backend, seconds * 1e3)
            del opt
            for p in params:
                p.data.normal_(0, 0.02, generator=gen)  # fresh values: no state carries over between rows
        for row in rows:  # ratios once the baseline of this problem is known
            if row["problem"] == problem and fused_time:
                row["vs_torch_fused"] = row["step_ms"] / 1e3 / fused_time
    tags = _timing.env_tags(device)
    tags["copy_bw_gbps"] = f"{copy_bw / 1e9:.0f}"
    _timing.CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags.get('card', device)} | {tags.get('date')} | commit {tags.get('commit')} | copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s | {args.dtype} parameters and gradients")
    print(_timing.format_table(rows, [("problem", "problem"), ("impl", "optimizer"), ("backend", "backend"),
                                      ("step_ms", "step ms"), ("eager_ms", "eager ms"),
                                      ("vs_torch_fused", "vs torch fused"),
                                      ("state_bytes_per_param", "state B/param"), ("pct_copy_bw", "% copy BW")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
