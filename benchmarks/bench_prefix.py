#!/usr/bin/env python
"""What a prefix costs at decode: generation with prefix tuning, prompt tuning and P-tuning against
the plain model, per new token.

The embedded model (or ``--model DIR``), batch 1, greedy, with a cache. Time per new token is
``(time(N new tokens) - time(1 new token)) / (N - 1)``, which leaves out the prompt's prefill, each
the median of ``--repeats`` runs. The virtual tokens are 16 by default: the prefix adds 16 cached
positions that every step attends to (and the hook that injects it checks, once per step, that
there is nothing to inject); prompt methods add 16 positions too. Rows: ``plain``, then each method
with its extra cost over the plain model measured in the same run.

Examples:
    python benchmarks/bench_prefix.py                      # CPU or GPU, the embedded model
    python benchmarks/bench_prefix.py --virtual-tokens 64 --new-tokens 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, CsvWriter, env_tags, format_table, positive_int, resolve_device, setup_logging  # noqa: E402

from lightllm.tuning import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402


def _timed_generate(model, ids, n: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_token_ms(models: dict, ids, new_tokens: int, repeats: int, device) -> dict[str, tuple[float, float]]:
    """name -> (ms per new token, ms of the 1-token run). The cases take turns in every round, so
    that a machine whose speed drifts (a shared CPU) shifts them all alike."""
    longs = {name: [] for name in models}
    shorts = {name: [] for name in models}
    for model in models.values():  # warm-up
        _timed_generate(model, ids, new_tokens, device)
    for _ in range(repeats):
        for name, model in models.items():
            longs[name].append(_timed_generate(model, ids, new_tokens, device))
            shorts[name].append(_timed_generate(model, ids, 1, device))
    out = {}
    for name in models:
        long, short = statistics.median(longs[name]), statistics.median(shorts[name])
        out[name] = (1e3 * (long - short) / (new_tokens - 1), 1e3 * short)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time greedy generation per new token with prefix tuning, prompt tuning "
                                            "and P-tuning against the plain model (batch 1, with a cache).")
    p.add_argument("--model", default=None, help="a Hugging Face causal LM folder (default: the embedded model)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run (default: auto)")
    p.add_argument("--virtual-tokens", type=positive_int, default=16, help="virtual tokens of each method (default 16)")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per timed run (default 128)")
    p.add_argument("--repeats", type=positive_int, default=9, help="timed rounds, the median kept (default 9)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_prefix.csv", help="CSV to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    setup_logging(args.verbose)
    device = resolve_device(args.device)
    from lightllm.models import load_model

    vt = args.virtual_tokens
    cases = {
        "plain": None,
        f"prefix tuning ({vt})": PrefixTuningConfig(num_virtual_tokens=vt),
        f"prompt tuning ({vt})": PromptTuningConfig(num_virtual_tokens=vt),
        f"P-tuning ({vt})": PromptEncoderConfig(num_virtual_tokens=vt),
    }
    ids = torch.randint(3, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    models = {}
    for name, config in cases.items():
        model, _ = load_model(args.model, device=device)
        model.eval()
        models[name] = model if config is None else get_peft_model(model, config)
    timings = per_token_ms(models, ids, args.new_tokens, args.repeats, device)
    base = timings["plain"][0]
    rows = [{"method": name, "virtual_tokens": 0 if cases[name] is None else vt, "ms_per_token": ms,
             "extra_pct": 100 * (ms / base - 1), "first_token_ms": prefill, "device": device.type,
             "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
            for name, (ms, prefill) in timings.items()]
    tags = env_tags(device)
    CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | batch 1, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy with a cache")
    print(format_table(rows, [("method", "method"), ("ms_per_token", "ms / new token"), ("extra_pct", "extra %"),
                              ("first_token_ms", "1-token run ms")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
