"""End-to-end decoding speed: Hugging Face ``generate`` at batch 1, fp16 against 4-bit QuantLinear.

The model is LLaMA-7B-shaped (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) cut to a few
decoder layers, with random weights: decoding speed does not depend on the values. Every linear
layer of the decoder (not the output head) is replaced by a round-to-nearest QuantLinear; each
lightllm backend that implements the matmul on the device is timed, and fp16 is the baseline.

  python benchmarks/bench_generate.py                 # GPU: 7B-shaped, 2 layers, 128 new tokens
  python benchmarks/bench_generate.py --device cpu    # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

import lightllm  # noqa: E402
from lightllm import backends  # noqa: E402
from lightllm.quantization import quantize_linears_rtn  # noqa: E402

logger = logging.getLogger("benchmarks.generate")

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000)
SHAPE_TINY = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=512)


def build_model(device: torch.device, layers: int, tiny: bool, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(SHAPE_TINY if tiny else SHAPE_7B), num_hidden_layers=layers, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, repeats: int,
                      **generate_kwargs) -> tuple[float, float]:
    """(median tokens/s, median seconds) of greedy generation of exactly ``new_tokens`` tokens."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  **generate_kwargs)
    with torch.inference_mode():
        model.generate(prompt, **kwargs)  # warm-up: kernels compiled, caches allocated
        times = []
        for _ in range(repeats):
            _timing.synchronize(prompt.device)
            t0 = time.perf_counter()
            model.generate(prompt, **kwargs)
            _timing.synchronize(prompt.device)
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    return new_tokens / seconds, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128 on a GPU, 16 on the CPU)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny model shapes (the default on the CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time each model with a static KV cache and torch.compile(mode='reduce-overhead'), "
                             "which replays the decode step as a CUDA graph (GPU only)")
    parser.add_argument("--out", default=str(_timing.RESULTS_DIR / "bench_generate.csv"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _timing.setup_logging(args.verbose)
    device = _timing.resolve_device(args.device)
    tiny = args.tiny or device.type == "cpu"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    new_tokens = args.new_tokens or (32 if args.quick else 128) if device.type == "cuda" else (args.new_tokens or 16)
    repeats = 1 if args.quick else args.repeats
    prompt = torch.randint(1, 500, (1, args.prompt_tokens), device=device)

    rows = []

    def measure(model, impl: str, backend: str) -> None:
        tps, sec = tokens_per_second(model, prompt, new_tokens, repeats)
        rows.append(dict(impl=impl, backend=backend, mode="eager", tokens_per_s=tps, seconds=sec))
        logger.info("%s (%s), eager: %.1f tokens/s", impl, backend, tps)
        if not args.cuda_graphs:
            return
        if device.type != "cuda":
            logger.info("--cuda-graphs needs a GPU; skipped")
            return
        try:
            graphed = copy.deepcopy(model)
            graphed.forward = torch.compile(graphed.forward, mode="reduce-overhead")
            tps, sec = tokens_per_second(graphed, prompt, new_tokens, repeats, cache_implementation="static")
        except Exception as exc:  # report, keep the eager rows
            logger.warning("%s (%s): CUDA graphs failed: %s: %s", impl, backend, type(exc).__name__, exc)
            return
        rows.append(dict(impl=impl, backend=backend, mode="cuda graphs", tokens_per_s=tps, seconds=sec))
        logger.info("%s (%s), CUDA graphs: %.1f tokens/s", impl, backend, tps)

    baseline = build_model(device, args.layers, tiny, dtype)
    measure(baseline, f"dense {str(dtype).replace('torch.', '')}", "-")
    quantized = quantize_linears_rtn(copy.deepcopy(baseline), args.bits, args.group_size, progress=False)
    del baseline
    for backend in lightllm.available_backends():
        if not backends.has_kernel("gptq_matmul", backend, device.type):
            continue
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is orders of magnitude off; not a speed
        with lightllm.use_backend(backend):
            measure(quantized, f"QuantLinear {args.bits}-bit g{args.group_size}", backend)

    dense = {row["mode"]: row["tokens_per_s"] for row in rows if row["backend"] == "-"}
    tags = _timing.env_tags(device)
    for row in rows:
        row.update(speedup_vs_dense=row["tokens_per_s"] / dense.get(row["mode"], float("nan")), layers=args.layers, new_tokens=new_tokens,
                   model="tiny" if tiny else "llama-7b-shape")
    _timing.CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags.get('card', device)} | {tags.get('date')} | commit {tags.get('commit')} | "
          f"{'tiny' if tiny else 'LLaMA-7B-shaped'} model, {args.layers} layers, batch 1, {new_tokens} new tokens")
    print(_timing.format_table(rows, [("impl", "impl"), ("backend", "backend"), ("mode", "mode"), ("tokens_per_s", "tokens/s"),
                                      ("seconds", "seconds"), ("speedup_vs_dense", "vs dense")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
