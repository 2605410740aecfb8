"""Train the embedded default model: a small LLaMA (grouped-query attention) on Shakespeare.

    python -m lightllm.models.train_shakespeare --out lightllm/models/shakespeare

Reproducible: a fixed seed, a byte-level BPE tokenizer trained on the training plays, random
256-token windows of the training plays, AdamW with warm-up and cosine decay. The held-out plays
(:data:`lightllm.data.HELD_OUT_PLAYS`) are never trained on; their loss is measured during training
and the checkpoint with the best held-out loss is kept. Writes a Hugging Face model directory
(float16 safetensors, tokenizer.json) plus ``training_log.json`` (the loss curve) and, when
matplotlib is installed, ``training_curve.png``. About 35 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time

import torch
from tqdm.auto import tqdm

from .. import data

logger = logging.getLogger("lightllm")

EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=1024)


def build_model(vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def encode_plays(tokenizer, split: str) -> torch.Tensor:
    """Token ids of a split, plays joined by the end-of-text token."""
    files = data.play_files()
    names = data.HELD_OUT_PLAYS if split == "heldout" else [n for n in files if n not in data.HELD_OUT_PLAYS]
    ids: list[int] = []
    for name in names:
        ids += tokenizer(data.clean_play(files[name].read_text(encoding="utf-8")))["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seqlen: int, max_windows: int) -> float:
    model.eval()
    windows = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)[:max_windows]
    total = 0.0
    for batch in windows.split(16):
        total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
    model.train()
    return total / windows.shape[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightllm.models.train_shakespeare",
                                     description="Train the embedded default model (small LLaMA on Shakespeare).")
    parser.add_argument("--out", required=True, help="model directory to write (replaced atomically)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = train_tokenizer(data.shakespeare_text("train"), args.vocab)
    train_ids, heldout_ids = encode_plays(tokenizer, "train"), encode_plays(tokenizer, "heldout")
    logger.info("tokens: %d training, %d held out", train_ids.numel(), heldout_ids.numel())
    model = build_model(len(tokenizer), args)
    logger.info("parameters: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    generator = torch.Generator().manual_seed(args.seed)
    log = {"args": vars(args), "train_tokens": train_ids.numel(), "heldout_tokens": heldout_ids.numel(),
           "steps": [], "train_loss": [], "heldout_loss": []}
    best, best_state = float("inf"), None
    start, running = time.time(), []
    for step in tqdm(range(1, args.steps + 1), desc="training"):
        offsets = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[o:o + args.seqlen] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            held = heldout_loss(model, heldout_ids, args.seqlen, max_windows=64)
            log["steps"].append(step)
            log["train_loss"].append(sum(running) / len(running))
            log["heldout_loss"].append(held)
            running = []
            logger.info("step %d  train %.4f  held-out %.4f  (%.0f s)", step, log["train_loss"][-1], held, time.time() - start)
            if held < best:
                best, best_state = held, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    # Convergence: held-out loss over the last 10% of steps.
    tail = [h for s, h in zip(log["steps"], log["heldout_loss"]) if s >= 0.9 * args.steps]
    log["heldout_improvement_last_10pct"] = (tail[0] - min(tail)) / tail[0] if tail else None
    log["best_heldout_loss"] = best
    log["seconds"] = time.time() - start
    logger.info("best held-out loss %.4f; improvement over the last 10%% of steps %.2f%%", best,
                100 * log["heldout_improvement_last_10pct"])

    out = pathlib.Path(args.out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(log["steps"], log["train_loss"], label="training (mean since last point)")
        ax.plot(log["steps"], log["heldout_loss"], label="held-out plays")
        ax.set_xlabel("step"); ax.set_ylabel("cross-entropy (nats/token)"); ax.legend(); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(tmp / "training_curve.png", dpi=110)
    except ImportError:
        logger.info("matplotlib not installed: no training_curve.png")
    tmp.chmod(0o755)  # mkdtemp makes it private; the model ships inside the package
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
