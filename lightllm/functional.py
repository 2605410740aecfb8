"""What users call directly: argument checks, then the ``lightllm::`` ops.

Block-wise quantization follows bitsandbytes (``bitsandbytes.functional``): the same dynamic map,
the same block layout and absmax, so codes and absmax move between the two libraries. So does its
4-bit NF4 / FP4 quantization (``quantize_4bit``, ``dequantize_4bit``, ``QuantState``; see
lightllm.quantization.bnb.nf4).
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.lightllm.*)
from .ops import adapter as _ops_adapter
from .ops import lora as _ops_lora
from .ops.blockwise import _PerMapCache
from .quantization.gptq.format import dequantize_gptq, pack_gptq, unpack_gptq
from .quantization.bnb.int8 import (int8_linear_matmul, int8_mixed_scaled_mm, int8_mm_dequant, int8_scaled_mm,
                                int8_vectorwise_dequant, int8_vectorwise_quant)
from .quantization.bnb.nf4 import QuantState, dequantize_4bit, get_4bit_type, quantize_4bit, quantize_fp4, quantize_nf4

__all__ = [
    "create_dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "pack_gptq",
    "unpack_gptq",
    "dequantize_gptq",
    "lora_linear",
    "QuantState",
    "get_4bit_type",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_scaled_mm",
    "int8_mixed_scaled_mm",
]

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic ("dynamic tree") quantization map: 256 sorted float32 values in [-1, 1].

    For each exponent ``i`` the values are the midpoints of an even split of [0.1, 1] scaled by
    ``10 ** (i - (max_exponent_bits - 1))``: ``2**(i + total_bits - 1 - max_exponent_bits)`` of them
    per decade, mirrored when ``signed``; an unsigned map spends the sign bit on one more fraction
    bit. 0 and 1 are added; maps of fewer than 8 bits are padded to 256 entries with zeros. The
    values equal bitsandbytes' ``create_dynamic_map`` exactly.
    """
    key = (signed, max_exponent_bits, total_bits)
    if key not in _dynamic_maps:
        _dynamic_maps[key] = _build_dynamic_map(signed, max_exponent_bits, total_bits)
    # A copy of the cached map: torch.compile reads the cache instead of tracing the build (whose
    # Python lists of tensor values would break the graph), and callers may write to their map.
    return _dynamic_maps[key].clone()


def _build_dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    non_sign_bits = total_bits - 1
    if not 1 <= total_bits <= 8:
        raise ValueError(f"create_dynamic_map: total_bits must be 1..8, got {total_bits}")
    if not 1 <= max_exponent_bits <= non_sign_bits:
        raise ValueError(
            f"create_dynamic_map: max_exponent_bits must be 1..{non_sign_bits} for total_bits={total_bits}, "
            f"got {max_exponent_bits}"
        )
    values: list[float] = []

    def add_decade(exponent: int, count: int) -> None:
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (exponent - (max_exponent_bits - 1))
        values.extend((scale * centres).tolist())
        if signed:
            values.extend((-scale * centres).tolist())

    fraction_shift = 0 if signed else 1
    for exponent in range(max_exponent_bits):
        add_decade(exponent, 2 ** (exponent + non_sign_bits - max_exponent_bits + fraction_shift))
    # Values whose exponent bits are all zero and that have no indicator bit.
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        add_decade(max_exponent_bits - 1, extra)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits}, total_bits={total_bits} "
            f"gives {len(values)} values, not {2**total_bits}"
        )
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


_dynamic_maps: dict[tuple[bool, int, int], torch.Tensor] = {}
create_dynamic_map(True)  # the maps the optimizers and double quantization use: cached from the start
create_dynamic_map(False)


# ---- argument checks ------------------------------------------------------------------------

def _check_blocksize(op: str, blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{op}: blocksize must be an int, got {type(blocksize).__name__}")
    if not (64 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"{op}: blocksize must be a power of two from 64 to 4096, got {blocksize}")
    return blocksize


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _map_is_sorted(code: torch.Tensor) -> torch.Tensor:
    # Cached per map object and version: on a GPU this check costs one host synchronization per map.
    return torch.tensor(bool((code[1:] >= code[:-1]).all()))


_sorted_cache = _PerMapCache(_map_is_sorted)
_default_maps: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _default_map(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, device)
    if key not in _default_maps:
        _default_maps[key] = create_dynamic_map(signed).to(device)
    return _default_maps[key]


def _resolve_map(op: str, code, device: torch.device) -> torch.Tensor:
    if code is None:
        return _default_map(True, device)
    _check_tensor(op, "code", code)
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != 256:
        raise ValueError(
            f"{op}: code must be a 1-D float32 tensor of 256 values, got {code.dtype} of shape {tuple(code.shape)}"
        )
    if code.device != device:
        raise ValueError(f"{op}: code is on {code.device} but the data is on {device}")
    message = f"{op}: code must be sorted in ascending order and free of NaN (as create_dynamic_map returns)"
    if torch.compiler.is_compiling():
        # bool() of a tensor is a data-dependent branch, a graph break under torch.compile: the
        # compiled graph asserts on the tensor instead (a RuntimeError with the same message)
        torch._assert_async((code[1:] >= code[:-1]).all(), message)
    elif not bool(_sorted_cache(code)):
        raise ValueError(message)
    return code.contiguous()


# ---- block-wise quantization ----------------------------------------------------------------

def quantize_blockwise(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096):
    """Quantize ``x`` to 8-bit codes, one float32 absmax per ``blocksize`` values.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (non-contiguous is fine).
        code: the 256-value sorted map (default: ``create_dynamic_map(signed=True)``), on x's device.
        blocksize: a power of two from 64 to 4096 (the 8-bit optimizers use 256).

    Returns:
        ``(codes, absmax)``: uint8 codes with x's shape and float32 absmax of
        ``ceil(x.numel() / blocksize)`` values. NaN or inf in a block makes that whole block
        dequantize to non-finite values; other blocks are unaffected.
    """
    op = "quantize_blockwise"
    _check_tensor(op, "x", x)
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    blocksize = _check_blocksize(op, blocksize)
    code = _resolve_map(op, code, x.device)
    return torch.ops.lightllm.quantize_blockwise(x, code, blocksize)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                         blocksize: int = 4096, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax`` per block, as ``dtype``."""
    op = "dequantize_blockwise"
    _check_tensor(op, "codes", codes)
    _check_tensor(op, "absmax", absmax)
    if codes.dtype != torch.uint8:
        raise TypeError(f"{op}: codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"{op}: absmax must be float32, got {absmax.dtype}")
    if dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    blocksize = _check_blocksize(op, blocksize)
    if absmax.device != codes.device:
        raise ValueError(f"{op}: absmax is on {absmax.device} but codes are on {codes.device}")
    n_blocks = -(-codes.numel() // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"{op}: absmax must hold ceil({codes.numel()} / {blocksize}) = {n_blocks} values for codes of shape "
            f"{tuple(codes.shape)}, got {absmax.numel()}"
        )
    code = _resolve_map(op, code, codes.device)
    return torch.ops.lightllm.dequantize_blockwise(codes, absmax.reshape(-1), code, blocksize, dtype)



def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA's layer, fused: ``x @ weight^T + bias + scale * (x @ lora_a^T) @ lora_b^T``.

    x [..., in_features] and weight [out_features, in_features] (any strides) share a float dtype;
    bias [out_features], lora_a [r, in_features] and lora_b [out_features, r] may be any float
    dtype. S = x lora_a^T is kept in float32 and the rank-r term is added before the one rounding
    to x's dtype; up to 16 tokens the CUDA and Triton kernels do it in one launch. Differentiable
    in x, the adapters, the bias and the weight (lightllm/ops/lora.py).
    """
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension (in_features)")
    y = _ops_lora.lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def bottleneck_adapter(z: torch.Tensor, res: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                       up_weight: torch.Tensor, up_bias: torch.Tensor | None, scale: float | torch.Tensor = 1.0,
                       act: str = "tanh") -> torch.Tensor:
    """A bottleneck adapter, fused: ``res + scale * (act(z @ down_weight^T + down_bias) @ up_weight^T + up_bias)``.

    z [..., K] and res [..., N] (the same leading dimensions, one float dtype); down_weight
    [bottleneck, K], up_weight [N, bottleneck], the biases (or None) and scale (a number, or a
    tensor of one element, e.g. a learned parameter) may be any float dtype. Computed in float32
    and rounded once to res's dtype; the Triton kernel does it in one launch up to 16 tokens.
    ``act`` is one of transformers' ACT2FN names the op knows (tanh, relu, gelu, gelu_new, silu,
    swish, sigmoid, leakyrelu, linear). Differentiable in every tensor (lightllm/ops/adapter.py).
    """
    if z.dim() < 1 or res.dim() < 1 or z.shape[:-1] != res.shape[:-1]:
        raise ValueError(f"bottleneck_adapter: z [..., K] and res [..., N] need the same leading dimensions, got "
                         f"{tuple(z.shape)} and {tuple(res.shape)}")
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor([float(scale)], dtype=torch.float32, device=z.device)
    y = _ops_adapter.bottleneck_adapter(z.reshape(-1, z.shape[-1]), res.reshape(-1, res.shape[-1]), down_weight,
                                        down_bias, up_weight, up_bias, scale, act)
    return y.reshape(res.shape)
