"""``python -m lightllm demo``: quantize the embedded model with RTN and GPTQ at 4 and 3 bits, and to
bitsandbytes' NF4 and LLM.int8, and compare held-out perplexity, size on disk, time and batch-1
decoding speed against full precision."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib
import tempfile
import time

import torch

from . import data
from .eval import eval_windows, perplexity, tokenize_stream
from .models import load_model
from .quantization import GPTQConfig, Int8Config, NF4Config, RTNConfig, quantize_, save_quantized
from .quantization.checkpoint import weight_files

logger = logging.getLogger("lightllm")

#: (label, config) of the demo's rows after full precision: GPTQ/RTN with group size 128,
#: symmetric; bitsandbytes' NF4 (double quantization, as QLoRA) and LLM.int8 (threshold 6.0).
DEMO_CONFIGS = (("RTN 4-bit g128", lambda: RTNConfig(bits=4, group_size=128)),
                ("GPTQ 4-bit g128", lambda: GPTQConfig(bits=4, group_size=128)),
                ("RTN 3-bit g128", lambda: RTNConfig(bits=3, group_size=128)),
                ("GPTQ 3-bit g128", lambda: GPTQConfig(bits=3, group_size=128)),
                ("NF4 (bitsandbytes)", NF4Config),
                ("LLM.int8 (bitsandbytes)", Int8Config))


@dataclasses.dataclass
class DemoRow:
    label: str
    perplexity: float
    size_bytes: int
    quantize_s: float
    eval_s: float
    decode_tokens_per_s: float | None = None


def _weights_size(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in weight_files(directory))


@torch.no_grad()
def _decode_speed(model, prompt: torch.Tensor) -> float:
    """Tokens per second of greedy batch-1 generation (64 new tokens on a GPU, 32 on the CPU)."""
    cuda = prompt.device.type == "cuda"
    new_tokens = 64 if cuda else 32
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, **kwargs)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def run_demo(model_dir=None, device=None, n_samples: int = 128, seqlen: int = 256, eval_seqlen: int = 256,
             progress: bool = True) -> dict:
    """Run the comparison; returns a dict with the rows and the token counts."""
    model, tokenizer = load_model(model_dir, device=device)
    device = next(model.parameters()).device
    heldout_ids = tokenize_stream(tokenizer, data.shakespeare_text("heldout"))
    calib = data.calibration_samples(tokenize_stream(tokenizer, data.shakespeare_text("train")), n_samples, seqlen)
    windows = eval_windows(heldout_ids, eval_seqlen)
    prompt = heldout_ids[:16][None].to(device)
    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, heldout_ids, eval_seqlen, progress=progress)
        eval_s = time.perf_counter() - start
        fp_dir = pathlib.Path(tmp) / "fp16"
        copy.deepcopy(model).to(torch.float16).save_pretrained(fp_dir)
        rows.append(DemoRow(f"full precision ({str(model.dtype).removeprefix('torch.')})", ppl,
                            _weights_size(fp_dir), 0.0, eval_s, _decode_speed(model, prompt)))
        for label, make_config in DEMO_CONFIGS:
            logger.info("demo: %s", label)
            quantized = copy.deepcopy(model)
            config = make_config()
            start = time.perf_counter()
            quantize_(quantized, config, calib if config.needs_calibration else None, progress=progress)
            if device.type == "cuda":
                torch.cuda.synchronize()
            quantize_s = time.perf_counter() - start
            start = time.perf_counter()
            ppl = perplexity(quantized, tokenizer, heldout_ids, eval_seqlen, progress=progress)
            eval_s = time.perf_counter() - start
            out = pathlib.Path(tmp) / label.replace(" ", "_")
            # dense parameters (embeddings, norms, head) in float16 in every row, as in the full-precision
            # row and the GPTQ files: the sizes then differ by the quantized layers only
            save_quantized(quantized, out, tokenizer=None, dtype=torch.float16)
            rows.append(DemoRow(label, ppl, _weights_size(out), quantize_s, eval_s, _decode_speed(quantized, prompt)))
            del quantized
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "calibration_tokens": calib.numel(), "calibration": f"{n_samples} x {seqlen} tokens of the training plays",
        "eval_tokens": windows.numel() - windows.shape[0], "eval_windows": windows.shape[0],
        "eval": f"held-out plays {', '.join(data.HELD_OUT_PLAYS)}, windows of {eval_seqlen} tokens",
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def goals(result: dict) -> list[tuple[str, bool, str]]:
    """The quality goals of the GPTQ issue, checked on a demo result: (goal, met, measured)."""
    ppl = {r["label"]: r["perplexity"] for r in result["rows"]}
    fp = result["rows"][0]["perplexity"]
    checks = []
    for bits in (4, 3):
        rtn, gptq = ppl[f"RTN {bits}-bit g128"], ppl[f"GPTQ {bits}-bit g128"]
        checks.append((f"GPTQ better than RTN at {bits}-bit g128", gptq < rtn, f"{gptq:.3f} vs {rtn:.3f}"))
    gptq4 = ppl["GPTQ 4-bit g128"]
    checks.append(("4-bit g128 GPTQ within 3% of full precision", gptq4 <= 1.03 * fp, f"+{100 * (gptq4 / fp - 1):.2f}%"))
    gap_gptq, gap_rtn = ppl["GPTQ 3-bit g128"] - fp, ppl["RTN 3-bit g128"] - fp
    ratio = gap_gptq / gap_rtn if gap_rtn > 0 else float("inf")
    checks.append(("3-bit g128 GPTQ gap at most 70% of RTN's", ratio <= 0.7, f"{100 * ratio:.0f}%"))
    return checks


def format_table(result: dict) -> str:
    with_speed = result["rows"][0]["decode_tokens_per_s"] is not None
    lines = [f"device: {result['device']}",
             f"calibration: {result['calibration']} ({result['calibration_tokens']} tokens)",
             f"evaluation: {result['eval']}; {result['eval_tokens']} predicted tokens in {result['eval_windows']} windows",
             ""]
    header = f"{'model':26s} {'perplexity':>10s} {'weights on disk':>16s} {'quantize':>9s} {'eval':>7s}"
    header += f" {'decode tok/s':>13s}" if with_speed else ""
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        line = (f"{r['label']:26s} {r['perplexity']:10.3f} {r['size_bytes'] / 2**20:13.2f} MiB "
                f"{r['quantize_s']:8.1f}s {r['eval_s']:6.1f}s")
        if with_speed:
            line += f" {r['decode_tokens_per_s']:13.1f}"
        lines.append(line)
    lines.append("")
    for goal, met, measured in goals(result):
        lines.append(f"{'met   ' if met else 'MISSED'} {goal}: {measured}")
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    pathlib.Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
