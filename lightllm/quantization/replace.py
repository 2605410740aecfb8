"""Whole-model swaps of ``nn.Linear`` layers without the block walk: the older entry points, now
thin names over :func:`lightllm.quantization.quantize_` and its one replacement routine."""

from __future__ import annotations

import logging
import re

from torch import nn

from .core import DEFAULT_SKIP, replace_each

logger = logging.getLogger("lightllm")


def replace_linears(model: nn.Module, make_layer, skip: str | None = DEFAULT_SKIP, desc: str = "quantize",
                    progress: bool = True) -> tuple[int, int]:
    """Replace every ``nn.Linear`` whose qualified name does not match ``skip`` (a regex; the output
    head by default) by ``make_layer(linear)``, in place; (replaced, candidates). A layer whose
    shape the format cannot hold (``make_layer`` raises ValueError) stays dense and is logged."""
    pattern = re.compile(skip) if skip else None
    targets = [(model, name, name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not (pattern and pattern.search(name))]
    return replace_each(targets, make_layer, desc, progress, len(targets)), len(targets)


def quantize_linears_rtn(model: nn.Module, bits: int = 4, group_size: int = 128, sym: bool = True,
                         checkpoint_format: str = "gptq", skip: str | None = DEFAULT_SKIP,
                         progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name does not match ``skip`` (the output head by
    default), inside transformer blocks or not, by a round-to-nearest ``QuantLinear``, in place.
    Returns the model. (``quantize_(model, RTNConfig(...))`` quantizes the blocks' Linears only,
    as AutoGPTQ does.)"""
    from .gptq.config import RTNConfig

    config = RTNConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=checkpoint_format)
    replaced, total = replace_linears(model, config.make_layer, skip, f"RTN {bits}-bit", progress)
    logger.info("quantized %d of %d linear layers to %d bits (group size %d)", replaced, total, bits, group_size)
    return model


def quantize_linears_4bit(model: nn.Module, quant_type: str = "nf4", compress_statistics: bool = True,
                          compute_dtype=None, blocksize: int = 64, skip: str | None = DEFAULT_SKIP,
                          progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` (but ``skip``, the output head by default) by bitsandbytes-format
    ``Linear4bit`` (NF4 by default, with double quantization: QLoRA's base), in place. Unlike
    ``quantize_(model, NF4Config())`` the blocksize may differ from transformers' 64."""
    from ..nn.linear4bit import Linear4bit

    replaced, total = replace_linears(
        model, lambda linear: Linear4bit.from_linear(linear, quant_type, compress_statistics, compute_dtype,
                                                     blocksize),
        skip, quant_type.upper(), progress)
    logger.info("quantized %d of %d linear layers to %s", replaced, total, quant_type)
    return model
