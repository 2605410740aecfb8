"""Swap a model's nn.Linear layers for QuantLinear (round-to-nearest for now; GPTQ builds on it)."""

from __future__ import annotations

import logging
import re

from torch import nn
from tqdm.auto import tqdm

from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("lightllm")


def quantize_linears_rtn(model: nn.Module, bits: int = 4, group_size: int = 128, sym: bool = True,
                         checkpoint_format: str = "gptq", skip: str | None = r"(^|\.)lm_head$",
                         progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name does not match ``skip`` (a regex; the output
    head by default) by a round-to-nearest ``QuantLinear``, in place. Returns the model.

    Layers whose shapes the packed layout cannot hold (e.g. in_features not a multiple of 32 at 3
    bits) are left dense and logged, so one odd projection does not stop a whole model.
    """
    pattern = re.compile(skip) if skip else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not (pattern and pattern.search(name))]
    replaced = 0
    for name, linear in tqdm(targets, desc=f"RTN {bits}-bit", disable=not progress):
        try:
            quantized = QuantLinear.from_linear(linear, bits, group_size, sym=sym, checkpoint_format=checkpoint_format)
        except ValueError as exc:
            logger.warning("leaving %s dense: %s", name, exc)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        replaced += 1
    logger.info("quantized %d of %d linear layers to %d bits (group size %d)", replaced, len(targets), bits, group_size)
    return model
