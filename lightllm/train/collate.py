"""Batches and the loss over them.

* :class:`Collator`: pads a list of tokenized records to the longest (rounded up to a multiple of 8,
  which tensor cores like), labels padded with -100, on the tokenizer's padding side.
* :func:`length_grouped_order`: a seeded epoch order in which each batch holds records of similar
  length (less padding), batches shuffled.
* :func:`token_loss_sum` / :func:`count_target_tokens`: the loss of an optimizer step is the mean over
  every target token of the whole accumulated batch, across micro-batches and processes, not the
  mean of per-micro-batch means (which weighs a token of a short micro-batch more than one of a
  long one: the gradient-accumulation bug transformers fixed in PR #34191). The training loop
  counts the step's target tokens first, then each micro-batch contributes its summed token loss
  divided by that count.
"""

from __future__ import annotations

import random

import torch

from .data import IGNORE_INDEX, Tokenized


class Collator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.multiple, self.side = pad_token_id, pad_to_multiple_of, padding_side

    def __call__(self, items: list[Tokenized]) -> dict[str, torch.Tensor]:
        longest = max(len(t.input_ids) for t in items)
        if self.multiple > 1:
            longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, t in enumerate(items):
            n = len(t.input_ids)
            cols = slice(longest - n, longest) if self.side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(t.input_ids)
            labels[row, cols] = torch.tensor(t.labels)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, megabatch: int = 50) -> list[int]:
    """Indices for one epoch: shuffled, then sorted by length within windows of ``megabatch``
    batches, so each batch holds similar lengths, and the batches shuffled again (seeded)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * megabatch
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start:start + window], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM is scored on in a batch: labels shifted by one, -100 excluded."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of every target token (labels shifted by one, as transformers' causal LM
    loss), in float32. ``logits`` may be longer than ``labels`` at the front (a prompt-tuned model
    prepends its virtual tokens): the last positions are used."""
    logits = logits[:, -labels.shape[1]:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
