"""Quantization formats and algorithms (GPTQ checkpoints, round-to-nearest)."""

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
from .replace import quantize_linears_rtn

__all__ = [
    "GPTQ_BITS",
    "detect_zero_convention",
    "dequantize_gptq",
    "pack_gptq",
    "pack_int",
    "quantize_linears_rtn",
    "quantize_rtn",
    "unpack_gptq",
    "unpack_int",
]
