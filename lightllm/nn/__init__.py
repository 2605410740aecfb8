"""Drop-in modules: quantized Linear layers and the StableEmbedding for 8-bit optimizers."""

from .quant_linear import QuantLinear
from .stable_embedding import StableEmbedding

__all__ = ["QuantLinear", "StableEmbedding"]
