"""GPTQ-format methods: the GPTQ solver (``gptq``) and round to nearest (``rtn``) on its grid, the
packed checkpoint format AutoGPTQ / GPTQModel / transformers read, and the calibrated block walk."""

from .format import (
    GPTQ_BITS,
    detect_zero_convention,
    dequantize_gptq,
    pack_gptq,
    pack_int,
    quantize_rtn,
    unpack_gptq,
    unpack_int,
)
from .solver import GPTQResult, HessianAccumulator, gptq_solve, gptq_solve_reference
from .config import GPTQConfig, QuantConfig, RTNConfig
from .calibrated import quantize_model

__all__ = ["GPTQ_BITS", "GPTQConfig", "GPTQResult", "HessianAccumulator", "QuantConfig", "RTNConfig",
           "detect_zero_convention", "dequantize_gptq", "gptq_solve", "gptq_solve_reference", "pack_gptq", "pack_int",
           "quantize_model", "quantize_rtn", "unpack_gptq", "unpack_int"]
