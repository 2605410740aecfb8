"""Command line: ``python -m lightllm <command>`` (also installed as ``lightllm``)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import lightllm
    from lightllm import _native, backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    print(f"lightllm {lightllm.__version__}")
    print(f"python   {platform.python_version()}   torch {torch.__version__}   triton {triton_version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"GPU {i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("GPU      none visible (torch.cuda.is_available() is False)")

    build = _native.build_summary()
    if build["native"]:
        cuda = f"CUDA kernels for {build['cuda_gencode']}" if build["cuda_kernels"] else "no CUDA kernels"
        print(f"native   lightllm._C loaded: C++ CPU kernels, {cuda}; built against torch {build['built_against_torch']}")
    else:
        print(f"native   lightllm._C not loaded: {build['reason']}")

    print("backends " + ", ".join(
        f"{b} ({'available' if backends.why_unavailable(b) is None else 'unavailable: ' + backends.why_unavailable(b)})"
        for b in backends.BACKENDS
    ))
    chosen = backends.get_backend()
    print(f"choice   {chosen}" + ("  (per-op defaults below)" if chosen == "auto" else "  (forced for every op)"))
    print()
    header = f"{'op':24s} {'implemented':28s} {'default cpu':12s} {'default gpu':12s} verified on a GPU"
    print(header)
    print("-" * len(header))
    for row in backends.op_table():
        verified = "; ".join(f"{b}: {rec['card']} @ {rec['commit']}" for b, rec in row["gpu_verified"].items())
        print(f"{row['op']:24s} {', '.join(row['implemented']):28s} {row['default_cpu']:12s} "
              f"{row['default_cuda']:12s} {verified or 'none yet (GPU default stays on the reference)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightllm",
        description="lightllm: quantized matmul, 8-bit optimizers and parameter-efficient tuning kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="show versions, the native build, available backends and which kernels are verified on a GPU",
        description="Show versions, the native build, available backends, per-op defaults and GPU verification.",
    )
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
