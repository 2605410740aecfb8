"""Swap a model's nn.Linear layers for quantized ones: one replacement loop for every format."""

from __future__ import annotations

import logging
import re

from torch import nn
from tqdm.auto import tqdm

from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("lightllm")


def replace_linears(model: nn.Module, make_layer, skip: str | None = r"(^|\.)lm_head$", desc: str = "quantize",
                    progress: bool = True) -> tuple[int, int]:
    """Replace every ``nn.Linear`` whose qualified name does not match ``skip`` (a regex; the output
    head by default) by ``make_layer(linear)``, in place; (replaced, candidates). A layer whose
    shape the format cannot hold (``make_layer`` raises ValueError) stays dense and is logged, so
    one odd projection does not stop a whole model."""
    pattern = re.compile(skip) if skip else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not (pattern and pattern.search(name))]
    replaced = 0
    for name, linear in tqdm(targets, desc=desc, disable=not progress):
        try:
            quantized = make_layer(linear)
        except ValueError as exc:
            logger.warning("leaving %s dense: %s", name, exc)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        replaced += 1
    return replaced, len(targets)


def quantize_linears_rtn(model: nn.Module, bits: int = 4, group_size: int = 128, sym: bool = True,
                         checkpoint_format: str = "gptq", skip: str | None = r"(^|\.)lm_head$",
                         progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name does not match ``skip`` (the output head by
    default) by a round-to-nearest ``QuantLinear``, in place. Returns the model."""
    replaced, total = replace_linears(
        model, lambda linear: QuantLinear.from_linear(linear, bits, group_size, sym=sym,
                                                      checkpoint_format=checkpoint_format),
        skip, f"RTN {bits}-bit", progress)
    logger.info("quantized %d of %d linear layers to %d bits (group size %d)", replaced, total, bits, group_size)
    return model


def quantize_linears_4bit(model: nn.Module, quant_type: str = "nf4", compress_statistics: bool = True,
                          compute_dtype=None, blocksize: int = 64, skip: str | None = r"(^|\.)lm_head$",
                          progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` (but ``skip``, the output head by default) by bitsandbytes-format
    ``Linear4bit`` (NF4 by default, with double quantization: QLoRA's base), in place."""
    from ..nn.linear4bit import Linear4bit

    replaced, total = replace_linears(
        model, lambda linear: Linear4bit.from_linear(linear, quant_type, compress_statistics, compute_dtype,
                                                     blocksize),
        skip, quant_type.upper(), progress)
    logger.info("quantized %d of %d linear layers to %s", replaced, total, quant_type)
    return model
