"""Perplexity the way GPTQ-for-LLaMa measures wikitext2: the text tokenized as one stream, cut into
non-overlapping windows of ``seqlen`` tokens (the tail that does not fill a window is dropped),
each window scored on its own. Perplexity = exp(mean negative log-likelihood of every predicted
token), each window predicting its tokens 2..seqlen.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The text as one LongTensor of token ids (no special tokens added)."""
    if not text:
        raise ValueError("perplexity: the text is empty")
    # Long streams exceed model_max_length on purpose: they are cut into windows afterwards.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(token_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[n_windows, seqlen]: the non-overlapping windows that are scored."""
    if seqlen < 2:
        raise ValueError(f"perplexity: seqlen must be at least 2, got {seqlen}")
    n = token_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"perplexity: the text has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return token_ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, tokenizer, text: str | torch.Tensor, seqlen: int = 256, batch_size: int = 8,
               progress: bool = True) -> float:
    """Perplexity of ``model`` on ``text`` (a string, or token ids already tokenized by ``tokenizer``).

    The model is any causal LM that returns ``.logits`` ([batch, seqlen, vocab]).
    """
    ids = text if isinstance(text, torch.Tensor) else tokenize_stream(tokenizer, text)
    windows = eval_windows(ids.flatten(), seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)
            # The last seqlen positions: a prompt-tuned model prepends its virtual tokens' logits.
            logits = model(input_ids=batch).logits[:, -batch.shape[1]:].float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
