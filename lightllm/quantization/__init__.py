"""Quantization: the GPTQ checkpoint format, the GPTQ solver, whole-model quantization, checkpoints."""

from .gptq_format import (
    GPTQ_BITS,
    detect_zero_convention,
    dequantize_gptq,
    pack_gptq,
    pack_int,
    quantize_rtn,
    unpack_gptq,
    unpack_int,
)
from .replace import quantize_linears_4bit, quantize_linears_rtn, replace_linears
from .gptq import GPTQResult, HessianAccumulator, gptq_solve, gptq_solve_reference
from .model import LayerListNotFoundError, QuantConfig, find_blocks, quantize_model
from .checkpoint import CheckpointError, load_quantized, save_quantized
from .bnb import BnbConfig

__all__ = [
    "BnbConfig",
    "CheckpointError",
    "GPTQResult",
    "HessianAccumulator",
    "LayerListNotFoundError",
    "QuantConfig",
    "find_blocks",
    "gptq_solve",
    "gptq_solve_reference",
    "load_quantized",
    "quantize_model",
    "save_quantized",
    "GPTQ_BITS",
    "detect_zero_convention",
    "dequantize_gptq",
    "pack_gptq",
    "pack_int",
    "quantize_linears_4bit",
    "quantize_linears_rtn",
    "replace_linears",
    "quantize_rtn",
    "unpack_gptq",
    "unpack_int",
]
