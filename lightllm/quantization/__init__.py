"""Quantization: one API for every method (``quantize_(model, config)``), the methods as packages
over that shared core (:mod:`.gptq`: GPTQ and round to nearest in the GPTQ format; :mod:`.bnb`:
bitsandbytes' NF4 / FP4 and LLM.int8), and checkpoints in the formats those tools read.

    from lightllm.quantization import quantize_, GPTQConfig, NF4Config, save_quantized
    quantize_(model, GPTQConfig(bits=4, group_size=128), calibration_ids)
    quantize_(other_model, NF4Config())
    save_quantized(model, "out/")        # load_quantized("out/") recognises every format
    quantize_checkpoint("float_dir/", "out/", GPTQConfig(bits=4), calibration_ids)  # one block in memory

Registered methods: ``methods()``; ``make_config(name, **fields)`` builds one by name (the CLI's
``--method``); ``config_from_dict`` reads a checkpoint's ``quantization_config``.
"""

from .core import (
    LayerListNotFoundError,
    QuantizationConfig,
    config_from_dict,
    find_blocks,
    make_config,
    methods,
    quantize_,
    register_format,
    register_method,
)
from .gptq import (
    GPTQ_BITS,
    GPTQConfig,
    GPTQResult,
    HessianAccumulator,
    QuantConfig,
    RTNConfig,
    detect_zero_convention,
    dequantize_gptq,
    gptq_solve,
    gptq_solve_reference,
    pack_gptq,
    pack_int,
    quantize_model,
    quantize_rtn,
    unpack_gptq,
    unpack_int,
)
from .bnb import BnbConfig, FP4Config, Int8Config, NF4Config
from .replace import quantize_linears_4bit, quantize_linears_rtn, replace_linears
from .checkpoint import CheckpointError, load_quantized, save_quantized
from .offload import quantize_checkpoint

__all__ = [
    "BnbConfig",
    "CheckpointError",
    "FP4Config",
    "GPTQConfig",
    "GPTQResult",
    "GPTQ_BITS",
    "HessianAccumulator",
    "Int8Config",
    "LayerListNotFoundError",
    "NF4Config",
    "QuantConfig",
    "QuantizationConfig",
    "RTNConfig",
    "config_from_dict",
    "detect_zero_convention",
    "dequantize_gptq",
    "find_blocks",
    "gptq_solve",
    "gptq_solve_reference",
    "load_quantized",
    "make_config",
    "methods",
    "pack_gptq",
    "pack_int",
    "quantize_",
    "quantize_checkpoint",
    "quantize_linears_4bit",
    "quantize_linears_rtn",
    "quantize_model",
    "quantize_rtn",
    "register_format",
    "register_method",
    "replace_linears",
    "save_quantized",
    "unpack_gptq",
    "unpack_int",
]
