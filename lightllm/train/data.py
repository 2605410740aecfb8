"""Instruction data: reading records, the embedded math task, and tokenization with loss masking.

Records, from JSON (a list) or JSONL files, several concatenated:

* instruction records: ``instruction``, optional ``input``, ``output`` (Alpaca, Alpaca-CoT's
  normalized files) and optionally ``answer`` (LLM-Adapters' math files: the number the evaluator
  checks);
* chat records: ``messages``, a list of ``{"role", "content"}``, rendered by the tokenizer's chat
  template; only the assistant turns are trained on.

A malformed record is an error naming its file and line.

Tokenization follows LLM-Adapters, with one change: the prompt (the template with the instruction
and input) and the response are tokenized separately and concatenated, so the masked prompt is
exactly the tokens the model sees at generation time (one joint tokenization can merge tokens
across the boundary and move it). Sequences are cut at ``cutoff_len``; EOS is appended when the
sequence was not cut and does not end with it, so the model learns to stop. ``train_on_inputs``
(default False) decides whether the prompt's tokens count in the loss: by default they are -100, as
Alpaca-CoT and QLoRA train, because the instruction is given at test time and learning to produce
it spends the model's capacity on text it never has to write (LLM-Adapters' default is True).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
from typing import Any, Iterable

from .templates import PromptTemplate

IGNORE_INDEX = -100


# ---- reading ---------------------------------------------------------------------------------

def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: a chat record needs at least one assistant message")
        return record
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: an instruction record needs a string {key!r} (or a chat record 'messages')")
    for key in ("input", "answer"):
        if key in record and record[key] is not None and not isinstance(record[key], (str, int, float)):
            raise ValueError(f"{where}: {key!r} must be a string")
    return record


def _json_array_lines(text: str, path: pathlib.Path) -> list[tuple[Any, int]]:
    """The elements of a JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise ValueError(f"{path}: a .json data file holds a list of records")
    i += 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise ValueError(f"{path}: the list of records is not closed")
        if text[i] == "]":
            return out
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out.append((value, text.count("\n", 0, i) + 1))
        i = end


def read_records(paths: Iterable[str | pathlib.Path]) -> list[dict[str, Any]]:
    """The records of every file, in order (JSON lists or JSONL)."""
    records: list[dict[str, Any]] = []
    for path in map(pathlib.Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                records.append(_check_record(value, f"{path}:{number}"))
        else:
            for value, number in _json_array_lines(text, path):
                records.append(_check_record(value, f"{path}:{number}"))
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, paths))}")
    return records


def write_records(records: list[dict[str, Any]], path: str | pathlib.Path) -> None:
    """JSON (a list, indented) or JSONL by the file's suffix, written to a temporary file and renamed."""
    import os
    import tempfile

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if path.suffix == ".jsonl"
            else json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# ---- tokenization ------------------------------------------------------------------------------

@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize_record(record: dict[str, Any], tokenizer, template: PromptTemplate, cutoff_len: int = 256,
                    train_on_inputs: bool = False, add_eos: bool = True) -> Tokenized:
    """One record as (input_ids, labels); see the module docstring."""
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    if "messages" in record:
        return _tokenize_chat(record["messages"], tokenizer, cutoff_len, train_on_inputs)
    prompt = template.prompt(record["instruction"], record.get("input") or "")
    response = record["output"]
    if response and not prompt[-1:].isspace() and not response[:1].isspace():
        response = " " + response  # "Answer:" + " 7", as the model will read and write it
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    ids = prompt_ids + response_ids
    truncated = len(ids) > cutoff_len
    ids = ids[:cutoff_len]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and not truncated and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        masked = min(len(prompt_ids), len(ids))
        labels[:masked] = [IGNORE_INDEX] * masked
    return Tokenized(ids, labels)


def _tokenize_chat(messages: list[dict[str, str]], tokenizer, cutoff_len: int, train_on_inputs: bool) -> Tokenized:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat records need a tokenizer with a chat template (this one has none)")

    def render(msgs, generation_prompt=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5

    ids = render(messages)
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    if not train_on_inputs:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise ValueError("the chat template renders a conversation differently from its prefixes, so the "
                                 "assistant turns cannot be found; use train_on_inputs=True")
            labels[len(before):len(through)] = through[len(before):]
    return Tokenized(ids[:cutoff_len], labels[:cutoff_len])


# ---- the embedded task: arithmetic word problems ----------------------------------------------------

_NAMES = ["Tom", "Anna", "Sam", "Lucy", "Ben", "Mia", "Jack", "Emma", "Leo", "Ruth", "Omar", "Nina", "Paul", "Ivy"]
_PRONOUN = {"Tom": "he", "Sam": "he", "Ben": "he", "Jack": "he", "Leo": "he", "Omar": "he", "Paul": "he"}
_OBJECTS = ["apples", "books", "pens", "coins", "shells", "stamps", "marbles", "cards", "cookies", "flowers",
            "balloons", "stickers"]

# One-step problems (AddSub / SingleEq style): (text, operation)
_ONE_STEP = [
    ("{n} has {a} {o}. {P} gets {b} more. How many {o} does {p} have now?", "+"),
    ("{n} had {a} {o}. {m} gave {p2} {b} more {o}. How many {o} does {n} have now?", "+"),
    ("There are {a} {o} in a box. {n} puts {b} more {o} in the box. How many {o} are in the box now?", "+"),
    ("{n} has {a} {o}. {P} gives {b} {o} to {m}. How many {o} does {n} have left?", "-"),
    ("{n} had {a} {o}. {P} lost {b} of them. How many {o} does {p} have now?", "-"),
    ("There are {a} {o} on a table. {n} takes {b} of them. How many {o} are on the table now?", "-"),
]
# Two-step problems (MultiArith style): (text, first operation, second operation)
_TWO_STEP = [
    ("{n} has {a} {o}. {P} buys {b} more and then gives {c} to {m}. How many {o} does {p} have now?", "+", "-"),
    ("{n} had {a} {o}. {P} gave {b} to {m} and then found {c} more. How many {o} does {p} have now?", "-", "+"),
    ("There are {a} {o} in a bag. {n} adds {b} and {m} adds {c}. How many {o} are in the bag now?", "+", "+"),
    ("{n} has {a} {o}. {P} eats {b} and gives {c} to {m}. How many {o} does {p} have left?", "-", "-"),
]


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _problem(rng: random.Random, steps: int, max_number: int) -> dict[str, Any] | None:
    name, other = rng.sample(_NAMES, 2)
    pronoun = _PRONOUN.get(name, "she")
    words = dict(n=name, m=other, o=rng.choice(_OBJECTS), p=pronoun, P=pronoun.capitalize(),
                 p2="him" if pronoun == "he" else "her")
    if steps == 1:
        text, op = rng.choice(_ONE_STEP)
        a, b = rng.randint(1, max_number), rng.randint(1, max_number)
        if op == "-" and a < b:
            a, b = b, a
        answer = _apply(a, op, b)
        rationale = f"{a} {op} {b} = {answer}."
        numbers = dict(a=a, b=b)
    else:
        text, op1, op2 = rng.choice(_TWO_STEP)
        a, b, c = (rng.randint(1, max_number) for _ in range(3))
        middle = _apply(a, op1, b)
        if middle < 0 or _apply(middle, op2, c) < 0:
            return None  # no negative counts of things
        answer = _apply(middle, op2, c)
        rationale = f"{a} {op1} {b} = {middle}. {middle} {op2} {c} = {answer}."
        numbers = dict(a=a, b=b, c=c)
    return {"instruction": text.format(**words, **numbers), "input": "",
            "output": f"{rationale} The answer is {answer}.", "answer": str(answer),
            "type": "one_step" if steps == 1 else "two_step"}


def math_task(split: str, n: int | None = None, seed: int = 0, one_step_max: int = 9,
              two_step_max: int = 9) -> list[dict[str, Any]]:
    """The embedded arithmetic word problems (AddSub / SingleEq / MultiArith style), as
    LLM-Adapters-format records with a one-line rationale and ``answer`` (and ``type``: one_step or
    two_step). Fixed splits: ``test`` (200 one-step problems with numbers up to ``one_step_max``,
    100 two-step) and ``train`` (``n`` problems, 2 one-step to 1 two-step, default 3000), drawn from
    one seeded generator; no test problem's text appears in the training split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"lightllm-math-{seed}")

    def draw(count: int, steps: int, max_number: int, exclude: set[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen = set(exclude)
        tries = 0
        while len(out) < count:
            tries += 1
            if tries > 100 * count + 1000:
                raise ValueError(f"cannot draw {count} distinct {steps}-step problems with numbers up to {max_number}")
            record = _problem(rng, steps, max_number)
            if record is None or record["instruction"] in seen:
                continue
            seen.add(record["instruction"])
            out.append(record)
        return out

    test = draw(200, 1, one_step_max, set()) + draw(100, 2, two_step_max, set())
    if split == "test":
        return test if n is None else test[:n]
    taken = {r["instruction"] for r in test}
    total = 3000 if n is None else n
    ones = draw(total - total // 3, 1, one_step_max, taken)
    twos = draw(total // 3, 2, two_step_max, taken)
    train = ones + twos
    random.Random(f"lightllm-math-order-{seed}").shuffle(train)
    return train
