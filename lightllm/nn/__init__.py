"""Drop-in modules: quantized Linear layers (GPTQ's QuantLinear, bitsandbytes' Linear4bit and Linear8bitLt) and the StableEmbedding for 8-bit optimizers.

The tuning methods' layers live with their methods (lightllm.tuning.lora, lightllm.tuning.adapter);
``lightllm.nn.LoraLinear`` and ``lightllm.nn.AdapterLayer`` still name them, resolved on first use
(lightllm.tuning imports this package, so a plain import here would be circular).
"""

from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit
from .linear8bit import Int8Params, Linear8bitLt
from .quant_linear import QuantLinear
from .stable_embedding import StableEmbedding

__all__ = ["AdapterLayer", "Int8Params", "Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "LoraLinear", "Params4bit", "QuantLinear",
           "StableEmbedding"]


def __getattr__(name):
    if name == "LoraLinear":
        from ..tuning.lora.layer import LoraLinear

        return LoraLinear
    if name == "AdapterLayer":
        from ..tuning.adapter.layer import AdapterLayer

        return AdapterLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
