"""Quantizing a model larger than the memory budget: ``quantize_checkpoint`` (one block resident)
against the in-memory path (``from_pretrained`` + ``quantize_`` + ``save_quantized``).

A LLaMA-shaped model is built from a config with random float16 weights and written to disk in
shards (tensor by tensor: the generator never holds the model either). Each path then runs in its
own subprocess, which reports its peak resident memory (``ru_maxrss``), its resident memory after
the imports (the interpreter, torch and transformers: the same for both) and its wall time. The
two checkpoints are compared tensor by tensor (bit for bit).

    # what RESULTS.md records (2 busy CPU cores): a 1.6 GB float16 model, 384 MiB budget
    python benchmarks/bench_offload_quantize.py --method rtn --layers 32 --hidden 1536 --intermediate 4096 \
        --heads 12 --kv-heads 4 --vocab 8192 --budget-mb 384 --skip-in-memory
    python benchmarks/bench_offload_quantize.py --method gptq --layers 6 --hidden 512 --intermediate 1536 \
        --heads 8 --kv-heads 8 --vocab 4096 --nsamples 4 --seqlen 128 --budget-mb 64 --shard-mb 16
    python benchmarks/bench_offload_quantize.py --quick                          # a smoke run

The bound checked: peak - baseline < budget + one block + calibration activations, where the
budget must hold what stays resident (embeddings and output head) and the method's working memory
(a layer's float copy and its quantization temporaries; GPTQ's Hessian and inverse), and the
model's weights should be at least 4x the budget. "baseline" is the resident size after the
imports and a first use of transformers' modeling code (the same for both paths: the
interpreter, torch and transformers take ~0.7 GB here). Prints one result row (JSON); progress
goes to logging.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import pathlib
import platform
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

logger = logging.getLogger("benchmarks")
REPO = pathlib.Path(__file__).resolve().parent.parent

_CHILD = textwrap.dedent("""
    import json, re, sys, time, torch, transformers
    import transformers.models.llama.modeling_llama  # imported before the baseline is taken
    import accelerate, safetensors  # idem (the streamed path's imports)
    from lightllm.quantization import make_config, quantize_, quantize_checkpoint, save_quantized
    mode, src, dst, n, seqlen, vocab, threads, method, dtype = sys.argv[1:10]
    torch.set_num_threads(int(threads))
    dtype = getattr(torch, dtype)
    calib = torch.randint(0, int(vocab), (int(n), int(seqlen)), generator=torch.Generator().manual_seed(0))
    config = make_config(method, bits=4, group_size=128) if method in ("gptq", "rtn") else make_config(method)
    calib = calib if config.needs_calibration else None
    def rss(field):  # bytes; VmHWM is the peak that ru_maxrss reports, and it can be reset
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    # transformers imports its modeling code lazily, on first use: use it once before the baseline
    # (a tiny model), so that what is measured is the quantization's memory, not import costs
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the peak here: importing torch and transformers peaks higher than what follows
    before = rss("VmRSS")
    start = time.perf_counter()
    if mode == "stream":
        quantize_checkpoint(src, dst, config, calib, dtype=dtype, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        quantize_(model, config, calib, progress=False)
        save_quantized(model, dst)
    seconds = time.perf_counter() - start
    peak = rss("VmHWM")
    print(json.dumps({"baseline": before, "peak": peak, "seconds": seconds}))
""")


def write_random_llama(directory: pathlib.Path, config, shard_bytes: int, seed: int = 0) -> int:
    """Random float16 weights for ``config``'s LlamaForCausalLM, written shard by shard as
    transformers names them; the total bytes. Weights ~ N(0, 0.02), norms 1."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    names = [(k, tuple(p.shape)) for k, p in skeleton.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")]
    gen = torch.Generator().manual_seed(seed)
    current, size = {}, 0
    files, weight_map, total = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(files) + 1}.safetensors"
            save_file(current, str(directory / name), metadata={"format": "pt"})
            files.append((name, list(current)))
            current, size = {}, 0

    for key, shape in names:
        t = (torch.ones(shape) if "norm" in key else torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        nbytes = t.numel() * 2
        if current and size + nbytes > shard_bytes:
            flush()
        current[key] = t
        size += nbytes
        total += nbytes
    flush()
    for i, (name, keys) in enumerate(files, 1):  # rename to transformers' pattern now that the count is known
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map.update(dict.fromkeys(keys, final))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = torch.float16
    config.save_pretrained(directory)
    return total


def run_child(mode, src, dst, args) -> dict:
    cmd = [sys.executable, "-c", _CHILD, mode, str(src), str(dst), str(args.nsamples), str(args.seqlen),
           str(args.vocab), str(args.threads), args.method, args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_tensors(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Every tensor of the two checkpoints equal, read one at a time."""
    from safetensors import safe_open

    def files(d: pathlib.Path) -> dict[str, pathlib.Path]:
        index = d / "model.safetensors.index.json"
        if index.exists():
            return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return dict.fromkeys(f.keys(), d / "model.safetensors")

    fa, fb = files(a), files(b)
    if sorted(fa) != sorted(fb):
        logger.error("the checkpoints hold different tensors: %s", sorted(set(fa) ^ set(fb))[:8])
        return False
    for key in fa:
        with safe_open(str(fa[key]), framework="pt") as x, safe_open(str(fb[key]), framework="pt") as y:
            tx, ty = x.get_tensor(key), y.get_tensor(key)
            if tx.dtype != ty.dtype or not torch.equal(tx, ty):
                logger.error("%s differs", key)
                return False
    return True


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-mb", type=float, default=512,
                   help="the memory budget in MiB the streamed peak is checked against (default 512)")
    p.add_argument("--layers", type=int, default=36, help="decoder blocks of the random LLaMA (default 36)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (default 1536)")
    p.add_argument("--intermediate", type=int, default=4096, help="MLP intermediate size (default 4096)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration sequences for GPTQ (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--method", default="gptq", help="gptq (default), rtn, nf4, fp4, int8; 4-bit groups of 128")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="what the blocks are computed in (default float32: half-precision matmuls are slow on CPUs)")
    p.add_argument("--shard-mb", type=float, default=500,
                   help="size of the random model's safetensors shards in MiB (default 500)")
    p.add_argument("--skip-in-memory", action="store_true", help="only the streamed path")
    p.add_argument("--quick", action="store_true", help="a tiny model (a smoke run, not a measurement)")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_mb, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 8, 4, 256, 512, 4, 2
        args.vocab, args.nsamples, args.seqlen, args.shard_mb = 256, 2, 32, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=max(2048, args.seqlen), tie_word_embeddings=False)
    head_dim = args.hidden // args.heads
    width = torch.finfo(getattr(torch, args.dtype)).bits // 8
    # one block as it is resident: in the compute dtype
    block = width * (2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim
                     + 3 * args.hidden * args.intermediate)
    rest = width * 2 * args.vocab * args.hidden
    tokens = args.nsamples * args.seqlen
    # a block's input and output hidden states, and its widest intermediate (the MLP's)
    activations = width * (2 * tokens * args.hidden + 3 * tokens * args.intermediate)
    budget = int(args.budget_mb * 2**20)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "src").mkdir()
        t0 = time.perf_counter()
        total = write_random_llama(tmp / "src", config, int(args.shard_mb * 2**20))
        logger.info("wrote a %.2f GB float16 model (%d layers) in %.0f s", total / 1e9, args.layers,
                    time.perf_counter() - t0)
        if total < 4 * budget:
            logger.warning("the model (%.0f MB) is less than 4x the budget (%.0f MB)", total / 2**20, budget / 2**20)
        streamed = run_child("stream", tmp / "src", tmp / "streamed", args)
        logger.info("streamed: %s", streamed)
        whole = None if args.skip_in_memory else run_child("memory", tmp / "src", tmp / "whole", args)
        if whole:
            logger.info("in memory: %s", whole)
        equal = same_tensors(tmp / "streamed", tmp / "whole") if whole else None

    grew = streamed["peak"] - streamed["baseline"]
    row = {
        "date": dt.date.today().isoformat(), "commit": git_commit(), "machine": platform.machine(),
        "method": args.method, "dtype": args.dtype, "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate, "vocab": args.vocab, "calibration_tokens": tokens,
        "cpu_threads": args.threads, "torch": torch.__version__, "model_bytes": total, "block_bytes": block,
        "resident_rest_bytes": rest, "activation_bytes": activations, "budget_bytes": budget,
        "streamed_peak_rss": streamed["peak"], "streamed_baseline_rss": streamed["baseline"],
        "streamed_grew": grew, "streamed_seconds": round(streamed["seconds"], 1),
        "bound": budget + block + activations, "within_bound": grew < budget + block + activations,
        "in_memory_peak_rss": whole and whole["peak"], "in_memory_grew": whole and whole["peak"] - whole["baseline"],
        "in_memory_seconds": whole and round(whole["seconds"], 1), "bit_for_bit_equal": equal,
    }
    print(json.dumps(row, indent=2))
    return 0 if row["within_bound"] and equal is not False else 1


if __name__ == "__main__":
    sys.exit(main())
