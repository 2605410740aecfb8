"""prepare_model_for_kbit_training: what a quantized base needs before any tuning method trains on it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import base_layer_kind

logger = logging.getLogger("lightllm")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Get a model with quantized layers ready for adapter training (PEFT's function of the same
    name, for lightllm's quantized layers). In place; returns the model.

    * Freezes every parameter (the adapters added afterwards train).
    * Upcasts every float16 / bfloat16 parameter outside the quantized layers (norms, embeddings,
      the output head) to float32, as PEFT does for k-bit bases: the norms' statistics and the
      head's logits then stay in float32, and the activations between the quantized layers become
      float32 (lightllm's quantized layers take float32 inputs and compute in them).
    * With ``use_gradient_checkpointing``: makes the input embeddings' output require grad (so the
      checkpointed blocks see a graph even though every weight is frozen) and turns on transformers'
      gradient checkpointing, non-reentrant unless ``gradient_checkpointing_kwargs`` says otherwise.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    packed = set()
    for module in model.modules():
        kind = base_layer_kind(module)
        if kind is not None and kind.quantized:
            packed.update(id(t) for t in module.parameters())
    upcast = 0
    for name, p in model.named_parameters():
        if id(p) not in packed and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            upcast += 1
    if upcast:
        logger.info("prepare_model_for_kbit_training: %d half-precision parameters upcast to float32", upcast)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        kwargs.update(gradient_checkpointing_kwargs or {})
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name
            enable = lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # noqa: E731
        elif hasattr(model, "gradient_checkpointing_enable"):
            enable = lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # noqa: E731
        else:
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable() (a transformers model "
                            "has); pass use_gradient_checkpointing=False")
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        enable()
    return model
