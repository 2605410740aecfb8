"""The embedded default model: a small LLaMA trained on Shakespeare (``shakespeare/``).

``default_model_dir()`` is where every CLI command looks when no ``--model`` is given. The
directory is a plain Hugging Face model directory (config.json, model.safetensors, tokenizer.json),
made by ``python -m lightllm.models.train_shakespeare``.
"""

from __future__ import annotations

import pathlib

DEFAULT_MODEL_NAME = "shakespeare"

# a folder holding any of these has a tokenizer of its own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_model_dir() -> pathlib.Path:
    return pathlib.Path(__file__).parent / DEFAULT_MODEL_NAME


def resolve_device(device: str | None):
    """``None``/"auto": the GPU when one is visible, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but torch sees no CUDA device")
    return device


def default_dtype(device):
    """What models compute in unless told: float16 on a GPU, float32 on the CPU (half-precision
    matmuls are slow there)."""
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_model(path=None, device=None, dtype=None, revision: str | None = None, subfolder: str | None = None):
    """(model, tokenizer) from a Hugging Face model directory (default: the embedded model) or a
    Hugging Face hub id (``org/name``, at ``revision``; ``subfolder`` inside the folder or repository),
    resolved through :func:`lightllm.hub.resolve_folder` (the local cache under ``HF_HUB_OFFLINE=1``).
    A model in a subfolder takes its tokenizer from there, or else from the folder above it.

    A GPTQ checkpoint (a ``quantization_config`` in config.json, or a quantize_config.json) loads
    with QuantLinear layers through :func:`lightllm.quantization.load_quantized`; anything else
    through transformers. ``dtype`` defaults to float16 on a GPU and float32 on the CPU.
    """
    from .._extras import require
    from ..hub import resolve_folder
    from ..quantization.checkpoint import load_quantized

    transformers = require("transformers", "lightllm.models.load_model")

    directory = resolve_folder(path if path is not None else default_model_dir(), revision, subfolder)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json)")
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder(directory, subfolder))
    if is_quantized_checkpoint(directory):
        model = load_quantized(directory, device=device, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


def tokenizer_folder(directory: pathlib.Path, subfolder: str | None = None) -> pathlib.Path:
    """Where the tokenizer of the model in ``directory`` is: there, or, for a model in ``subfolder``
    without tokenizer files of its own, the folder (or repository snapshot) above it."""
    from ..hub import repo_root

    if subfolder is not None and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return repo_root(directory, subfolder)
    return directory


def is_quantized_checkpoint(directory) -> bool:
    import json

    directory = pathlib.Path(directory)
    if (directory / "quantize_config.json").is_file():
        return True
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return "quantization_config" in config
