"""Accuracy on math word problems, as LLM-Adapters' evaluate.py scores them, batched.

Each record's prompt (the template with its instruction and input) is generated from greedily,
many at a time (left padding); the answer read from the response is compared with the record's
``answer``:

* numbers: commas removed, the **last** number in the response (``-?\\d+\\.?\\d*``); correct when
  within 1e-3 of the answer (LLM-Adapters' rule);
* options (an answer that is one letter A-E, AQuA style): the first option letter that stands as a
  word of its own. LLM-Adapters takes the first capital A-E anywhere, so the E of "Each" counts as
  answer E; here it does not.

Every generation is written, with what was read from it, to a JSONL file for inspection.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import torch
from tqdm.auto import tqdm

from ..train.templates import PromptTemplate, get_template

_NUMBER = re.compile(r"-?\d+\.?\d*")
_OPTION = re.compile(r"\b([A-E])\b")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def extract_option(text: str) -> str | None:
    """The first option letter A-E that is a word by itself, or None."""
    found = _OPTION.search(text)
    return found.group(1) if found else None


def is_correct(response: str, answer: str) -> tuple[bool, Any]:
    """(correct, what was read) for one response."""
    answer = str(answer).strip()
    if re.fullmatch(r"[A-E]", answer):
        option = extract_option(response)
        return option == answer, option
    value = extract_number(response)
    try:
        target = float(answer.replace(",", ""))
    except ValueError:
        raise ValueError(f"answer {answer!r} is neither a number nor an option letter A-E") from None
    return value is not None and math.isfinite(value) and abs(value - target) <= 1e-3, value


@torch.no_grad()
def evaluate_math(model, tokenizer, records: list[dict[str, Any]], template: PromptTemplate | str | None = None,
                  batch_size: int = 32, max_new_tokens: int = 32, jsonl_path=None, progress: bool = True,
                  device=None) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` on ``records`` (LLM-Adapters' format: instruction, input,
    answer; ``type`` groups the accuracy by kind). Returns ``{"accuracy", "correct", "total",
    "by_type": {type: accuracy}}``; writes every generation to ``jsonl_path`` when given."""
    template = template if isinstance(template, PromptTemplate) else get_template(template)
    if not records:
        raise ValueError("evaluate_math: no records")
    for i, r in enumerate(records):
        if "answer" not in r or "instruction" not in r:
            raise ValueError(f"evaluate_math: record {i} needs 'instruction' and 'answer'")
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc="math eval", disable=not progress):
            chunk = records[start:start + batch_size]
            prompts = [tokenizer(template.prompt(r["instruction"], r.get("input") or ""), add_special_tokens=False)
                       ["input_ids"] for r in chunk]
            longest = max(map(len, prompts))
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
                ids[row, longest - len(p):] = torch.tensor(p)
                mask[row, longest - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for r, seq in zip(chunk, out[:, longest:].tolist()):
                response = tokenizer.decode(seq, skip_special_tokens=True).strip()
                ok, read = is_correct(response, r["answer"])
                rows.append({"instruction": r["instruction"], "answer": str(r["answer"]), "response": response,
                             "read": read, "correct": ok, "type": r.get("type")})
    finally:
        model.train(was_training)
    correct = sum(r["correct"] for r in rows)
    by_type: dict[str, list[int]] = {}
    for r in rows:
        if r["type"] is not None:
            hits = by_type.setdefault(r["type"], [0, 0])
            hits[0] += r["correct"]
            hits[1] += 1
    if jsonl_path is not None:
        path = pathlib.Path(jsonl_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
            "by_type": {k: c / n for k, (c, n) in by_type.items()}}
