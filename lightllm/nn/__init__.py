"""Drop-in modules: quantized Linear layers, LoRA layers and the StableEmbedding for 8-bit optimizers."""

from .lora import LoraLinear
from .quant_linear import QuantLinear
from .stable_embedding import StableEmbedding

__all__ = ["LoraLinear", "QuantLinear", "StableEmbedding"]
