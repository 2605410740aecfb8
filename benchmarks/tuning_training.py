#!/usr/bin/env python
"""Train every tuning method on the embedded model and report what it learns.

The check behind the README's tables for bottleneck adapters and prompt learning (tests/test_adapter.py
and tests/test_prefix.py run the same loop for fewer steps and assert the gain): for each method,
the adapter on the embedded Shakespeare model is trained on the first 85% of Macbeth (4 x 128-token
windows per step, AdamW8bit, the method's learning rate, seed 0); then the training loss on 8 fixed
training windows, the perplexity of the last 15% of Macbeth (held out) and of The Tempest (another
play) are measured before and after. Prints a table and appends rows (tagged with machine, date,
commit) to a CSV.

Examples:
    python benchmarks/tuning_training.py                  # 100 steps per method, about 3 minutes on 2 cores
    python benchmarks/tuning_training.py --steps 20 --methods houlsby prefix-mlp
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
from _timing import RESULTS_DIR, CsvWriter, env_tags, format_table, positive_int, setup_logging  # noqa: E402

from lightllm.tuning import (AdapterConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,  # noqa: E402
                             get_peft_model)

logger = logging.getLogger("benchmarks.tuning_training")

# key -> (label, config, learning rate). Prompt learning trains far fewer numbers and wants a larger rate.
METHODS = {
    "series": ("adapter: series (LLM-Adapters: mh + output), bottleneck 32", AdapterConfig(bottleneck_size=32), 1e-3),
    "adapterp": ("adapter: AdapterP (output on down_proj), 32", AdapterConfig(bottleneck_size=32, use_adapterp=True),
                 1e-3),
    "parallel-llm": ("adapter: parallel (LLM-Adapters, q/k/v), 32",
                     AdapterConfig(bottleneck_size=32, use_parallel_adapter=True), 1e-3),
    "houlsby": ("adapter: Houlsby (preset)", AdapterConfig.from_preset("houlsby"), 1e-3),
    "pfeiffer": ("adapter: Pfeiffer (preset)", AdapterConfig.from_preset("pfeiffer"), 1e-3),
    "parallel": ("adapter: parallel (He et al., preset)", AdapterConfig.from_preset("parallel"), 1e-3),
    "prefix-mlp": ("prefix tuning, 16 tokens, MLP (zero init)",
                   PrefixTuningConfig(num_virtual_tokens=16, prefix_projection=True, init_weights="zero"), 1e-2),
    "prefix": ("prefix tuning, 16 tokens, no MLP", PrefixTuningConfig(num_virtual_tokens=16), 1e-2),
    "prompt": ("prompt tuning, 16 tokens (SAMPLE_VOCAB init)",
               PromptTuningConfig(num_virtual_tokens=16, prompt_tuning_init="SAMPLE_VOCAB"), 1e-2),
    "p-tuning": ("P-tuning, 16 tokens, MLP", PromptEncoderConfig(num_virtual_tokens=16), 1e-3),
}


def train_one(config, steps: int, lr: float) -> dict:
    from lightllm import data
    from lightllm.eval import perplexity, tokenize_stream
    from lightllm.models import load_model
    from lightllm.optim import AdamW8bit

    heldout = data.shakespeare_text("heldout")
    play, other = heldout[: len(heldout) // 2], heldout[len(heldout) // 2:]
    cut = int(len(play) * 0.85)
    model, tokenizer = load_model(device="cpu")
    torch.manual_seed(0)
    wrapped = get_peft_model(model, copy.deepcopy(config))
    trainable, total = wrapped.get_nb_trainable_parameters()
    wrapped.eval()
    ids = tokenize_stream(tokenizer, play[:cut])
    fixed = data.calibration_samples(ids, 8, 128, seed=99)  # training windows, scored before and after

    def train_loss() -> float:
        with torch.no_grad():
            return float(wrapped(input_ids=fixed, labels=fixed).loss)

    before, loss_before = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False), train_loss()
    opt = AdamW8bit([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    wrapped.train()
    losses = []
    t0 = time.perf_counter()
    for batch in data.calibration_samples(ids, 4 * steps, 128, seed=1).view(steps, 4, 128):
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    wrapped.eval()
    return {"trainable": trainable, "trainable_pct": 100 * trainable / total, "lr": lr,
            "loss_before": loss_before, "loss_after": train_loss(),
            "ppl_before": before, "ppl_after": perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False),
            "ppl_other_play": perplexity(wrapped, tokenizer, other, seqlen=256, progress=False),
            "train_seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train each tuning method on the embedded model (Macbeth) and report "
                                            "training loss and held-out perplexity before and after.")
    p.add_argument("--steps", type=positive_int, default=100, help="training steps of 4 x 128 tokens (default 100)")
    p.add_argument("--lr", type=float, default=None, help="AdamW8bit learning rate (default: the method's)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="which methods (default: all)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "tuning_training.csv", help="CSV to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for key in args.methods:
        label, config, lr = METHODS[key]
        row = {"method": label, "steps": args.steps, **train_one(config, args.steps, args.lr or lr)}
        logger.info("%s: held-out perplexity %.2f -> %.2f", label, row["ppl_before"], row["ppl_after"])
        rows.append(row)
    tags = env_tags(torch.device("cpu"))
    CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | {args.steps} steps of 4 x 128 tokens")
    print(format_table(rows, [("method", "method"), ("trainable", "trainable"), ("trainable_pct", "%"), ("lr", "lr"),
                              ("loss_before", "train loss before"), ("loss_after", "after"),
                              ("ppl_before", "held-out ppl before"), ("ppl_after", "after"),
                              ("ppl_other_play", "The Tempest"), ("train_seconds", "train s")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
