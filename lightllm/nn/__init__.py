"""Drop-in modules: quantized Linear layers (and, later, LoRA, adapters, StableEmbedding)."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
