#!/usr/bin/env python
"""Time a LoRA fine-tuning step: the plain peft reference against lightllm, same model, same batches.

The issue's calibration reference is a plain peft LoRA (r 16, all seven projections) trained with
torch's AdamW on the embedded math task. This benchmark runs that reference and lightllm's
``finetune()`` (fused LoRA layers, AdamW8bit by default) on the same records in the same
length-grouped order, batch 16, and reports seconds per optimizer step (median over the timed steps,
after warm-up steps), tokens per second, and the ratio. A middle row (lightllm's LoRA with torch's
AdamW) separates the layer from the optimizer. Each row runs in a fresh process so that one run's
memory and thread pools do not slow the next. Needs peft.

Examples:
    python benchmarks/bench_finetune.py                 # 40 timed steps per row, about 2 minutes on 2 cores
    python benchmarks/bench_finetune.py --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, CsvWriter, env_tags, format_table, positive_int, setup_logging, warn_if_busy  # noqa: E402

logger = logging.getLogger("benchmarks.bench_finetune")

ROWS = (("peft LoRA + torch AdamW (reference)", "peft", "adamw"),
        ("lightllm LoRA + torch AdamW", "lightllm", "adamw"),
        ("lightllm LoRA + AdamW8bit (finetune default)", "lightllm", "adamw8bit"))


def _batches(tokenizer, count: int, batch_size: int, seed: int):
    """``count`` collated batches of the embedded math task in lightllm's length-grouped order."""
    from lightllm.train.collate import Collator, length_grouped_order
    from lightllm.train.data import math_task, tokenize_record
    from lightllm.train.templates import get_template

    template = get_template("qa")
    items = [tokenize_record(r, tokenizer, template) for r in math_task("train", seed=seed)]
    order = length_grouped_order([len(t.input_ids) for t in items], batch_size, seed=seed)
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return [collate([items[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(count)]


def _run(job: dict) -> dict:
    """One row in its own process: seconds per optimizer step over the timed steps."""
    from lightllm.models import load_model
    from lightllm.train.collate import count_target_tokens, token_loss_sum
    from lightllm.train.loop import build_optimizer

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model, tokenizer = load_model(device=device, dtype=torch.float32)
    torch.manual_seed(0)
    if job["impl"] == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             task_type="CAUSAL_LM"))
    else:
        from lightllm.tuning import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(job["optimizer"], params, 3e-3, 0.0)
    wrapped.train()
    batches = _batches(tokenizer, job["warmup"] + job["steps"], job["batch_size"], seed=0)
    times, tokens, losses = [], 0, []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        count = count_target_tokens(labels)
        loss = token_loss_sum(wrapped(**batch).logits, labels) / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # synchronizes
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
            losses.append(value)
    return {"row": job["label"], "s_per_step": statistics.median(times), "tokens_per_s": tokens / sum(times),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Seconds per LoRA fine-tuning step: plain peft + torch AdamW against "
                                            "lightllm (fused LoRA, AdamW8bit), same model and batches.")
    p.add_argument("--steps", type=positive_int, default=40, help="timed optimizer steps per row (default 40)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="records per step (default 16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_finetune.csv", help="CSV to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    device = torch.device(args.device)
    warn_if_busy(device)
    rows = []
    for label, impl, optimizer in ROWS:
        job = {"label": label, "impl": impl, "optimizer": optimizer, "device": args.device, "steps": args.steps,
               "warmup": args.warmup, "batch_size": args.batch_size, "threads": args.threads or torch.get_num_threads()}
        logger.info("%s", label)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(_run, job).result())
    reference = rows[0]["s_per_step"]
    for row in rows:
        row["speedup"] = reference / row["s_per_step"]
    tags = env_tags(device)
    CsvWriter(args.out, tags).write(rows)
    print(f"\n{tags['card']} | {tags['date']} | commit {tags['commit']} | embedded model, math task, "
          f"batch {args.batch_size}, {args.steps} timed steps")
    print(format_table(rows, [("row", "run"), ("s_per_step", "s/step"), ("tokens_per_s", "tokens/s"),
                              ("speedup", "x reference"), ("first_loss", "loss first"), ("last_loss", "last")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
