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

__all__ = [
    "GPTQ_BITS",
    "detect_zero_convention",
    "dequantize_gptq",
    "pack_gptq",
    "pack_int",
    "quantize_rtn",
    "unpack_gptq",
    "unpack_int",
]
