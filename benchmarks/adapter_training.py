#!/usr/bin/env python
"""Train bottleneck adapters of every placement on the embedded model and report what they learn.

The check behind the README's adapter table (tests/test_adapter.py runs the same loop for fewer
steps and asserts the gain): for each placement, adapters on the embedded Shakespeare model are
trained on the first 85% of Macbeth (4 x 128-token windows per step, AdamW8bit, lr 1e-3, seed 0),
then the perplexity of the last 15% of Macbeth (held out) and of The Tempest (another play) is
measured. Prints a table and appends rows (tagged with machine, date, commit) to a CSV.

Examples:
    python benchmarks/adapter_training.py                    # 100 steps per placement, about 2 minutes on 2 cores
    python benchmarks/adapter_training.py --steps 20 --placements houlsby pfeiffer
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

from lightllm.tuning import AdapterConfig, get_peft_model  # noqa: E402

logger = logging.getLogger("benchmarks.adapter_training")

PLACEMENTS = {
    "series": ("series (LLM-Adapters: mh + output), bottleneck 32", AdapterConfig(bottleneck_size=32)),
    "adapterp": ("AdapterP (output on down_proj), 32", AdapterConfig(bottleneck_size=32, use_adapterp=True)),
    "parallel-llm": ("parallel (LLM-Adapters, q/k/v), 32", AdapterConfig(bottleneck_size=32, use_parallel_adapter=True)),
    "houlsby": ("Houlsby (preset)", AdapterConfig.from_preset("houlsby")),
    "pfeiffer": ("Pfeiffer (preset)", AdapterConfig.from_preset("pfeiffer")),
    "parallel": ("parallel (He et al., preset)", AdapterConfig.from_preset("parallel")),
}


def train_one(config: AdapterConfig, steps: int, lr: float) -> dict:
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
    before = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False)
    opt = AdamW8bit([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    ids = tokenize_stream(tokenizer, play[:cut])
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
    window = min(5, len(losses))
    return {"trainable": trainable, "trainable_pct": 100 * trainable / total,
            "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
            "ppl_before": before, "ppl_after": perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False),
            "ppl_other_play": perplexity(wrapped, tokenizer, other, seqlen=256, progress=False),
            "train_seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train bottleneck adapters of each placement on the embedded model "
                                            "(Macbeth) and report loss and held-out perplexity.")
    p.add_argument("--steps", type=positive_int, default=100, help="training steps of 4 x 128 tokens (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW8bit learning rate (default 1e-3)")
    p.add_argument("--placements", nargs="+", choices=sorted(PLACEMENTS), default=list(PLACEMENTS),
                   help="which placements (default: all)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "adapter_training.csv", help="CSV to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for key in args.placements:
        label, config = PLACEMENTS[key]
        row = {"placement": label, "steps": args.steps, "lr": args.lr, **train_one(config, args.steps, args.lr)}
        logger.info("%s: held-out perplexity %.2f -> %.2f", label, row["ppl_before"], row["ppl_after"])
        rows.append(row)
    tags = env_tags(torch.device("cpu"))
    CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | {args.steps} steps of 4 x 128 tokens")
    print(format_table(rows, [("placement", "placement"), ("trainable", "trainable"), ("trainable_pct", "%"),
                              ("loss_first", "loss first"), ("loss_last", "loss last"),
                              ("ppl_before", "held-out ppl before"), ("ppl_after", "after"),
                              ("ppl_other_play", "The Tempest"), ("train_seconds", "train s")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
