"""Ops ``lightllm::quantize_4bit``, ``lightllm::dequantize_4bit`` and ``lightllm::matmul_4bit``:
bitsandbytes' 4-bit NF4 / FP4 format (QLoRA's), defined here by the reference and followed bit for
bit by every backend.

Format (bitsandbytes 0.50, its CPU path):

* The flat input (row-major ``[N, K]`` for a weight) is split into blocks of ``blocksize`` values;
  ``absmax[b]`` is the block's largest |x| in float32.
* A value is scaled to [-1, 1] as ``x * (1 / max(absmax, 1e-38))`` in float32 (bitsandbytes
  divides by that absmax instead in a short last block; so do we), clamped to [-1, 1], and gets
  the index of the nearest of the 16 code values: midpoints between neighbouring sorted codes, a
  value exactly on a midpoint takes the lower one. For FP4 the index is then the code's bit
  pattern (its position in the table, which is not sorted).
* Two codes per byte, the first value in the high nibble; an odd count is padded with the code
  of 0.0. The bytes are stored as ``[ceil(n / 2), 1]``, or viewed as another ``quant_storage``
  dtype (``[n / (2 * itemsize), 1]``).
* Dequantization is ``code[c] * absmax`` in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch

from .. import _native
from ..backends import register, resolve

QUANTIZE = "quantize_4bit"
DEQUANTIZE = "dequantize_4bit"
MATMUL = "matmul_4bit"

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# NF4: the 16 quantiles of a standard normal normalized to [-1, 1], with an exact 0 (QLoRA, Dettmers
# et al. 2023); these are bitsandbytes' float32 values, index order = code order.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (e2m1, no infinities): the value of each 4-bit pattern, sign bit first, before normalizing by
# the largest magnitude (12). Pattern 0b0001 is bitsandbytes' subnormal 0.0625.
FP4_PATTERN_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                      -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        values = torch.tensor(FP4_PATTERN_VALUES, dtype=torch.float32)
        return values / values.abs().max()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values of a 4-bit type, indexed by code (bitsandbytes' ``get_4bit_type``); a new
    tensor each call (each layer's quant state owns its table: checkpoints store one per layer)."""
    return _code_cpu(quant_type).to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _search_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.argsort(code, stable=True)  # fp4's -0.0 and 0.0 tie: the stable order keeps 0.0's pattern first
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


def _search_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bounds, order = _search_cpu(quant_type)
    return bounds.to(device), order.to(device)


# ---- reference (pure PyTorch, any device) ---------------------------------------------------

def quantize_4bit_reference(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n / 2)], float32 absmax [ceil(n / blocksize)])."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max.clamp(min=1e-38)).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad takes the code of 0.0
    bounds, order = _search_tables(quant_type, x.device)
    codes = order[torch.bucketize(scaled, bounds)]
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_4bit_reference(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """The flat ``n`` values, as ``dtype``."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = code_table(quant_type, packed.device)[codes]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                          quant_type: str, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + bias`` for the 4-bit weight W [out_features, K], in x's dtype (W rounded to it)."""
    k = x.shape[-1]
    weight = dequantize_4bit_reference(packed, absmax, blocksize, quant_type, out_features * k, x.dtype)
    return torch.nn.functional.linear(x, weight.view(out_features, k), None if bias is None else bias.to(x.dtype))


register(QUANTIZE, "torch", ("cpu", "cuda"))(quantize_4bit_reference)
register(DEQUANTIZE, "torch", ("cpu", "cuda"))(dequantize_4bit_reference)
register(MATMUL, "torch", ("cpu", "cuda"))(matmul_4bit_reference)


# ---- C++ CPU kernels (csrc/fourbit_cpu.cpp) ---------------------------------------------------
# quantize / dequantize: the reference's bits. matmul: up to 16 rows of x a GEMV that reads the packed
# weight once (float32 accumulation, one rounding to x's dtype: the reference's result up to summation
# order); above 16 rows the C++ dequantization and torch's matmul, the reference's bits.

@register(QUANTIZE, "cpp", ("cpu",))
def _quantize_cpp(x, blocksize, quant_type):
    return _native.cpp_module().quantize_4bit(x, _code_cpu(quant_type), blocksize)


@register(DEQUANTIZE, "cpp", ("cpu",))
def _dequantize_cpp(packed, absmax, blocksize, quant_type, n, dtype):
    return _native.cpp_module().dequantize_4bit(packed.reshape(-1), absmax, _code_cpu(quant_type), blocksize, n, dtype)


@register(MATMUL, "cpp", ("cpu",))
def _matmul_cpp(x, packed, absmax, blocksize, quant_type, out_features, bias):
    return _native.cpp_module().matmul_4bit(x, packed.reshape(-1), absmax, _code_cpu(quant_type), blocksize,
                                            out_features, bias)


# ---- the custom ops -------------------------------------------------------------------------

@torch.library.custom_op("lightllm::quantize_4bit", mutates_args=())
def quantize_4bit_op(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, impl = resolve(QUANTIZE, x.device)
    return impl(x, blocksize, quant_type)


@quantize_4bit_op.register_fake
def _(x, blocksize, quant_type):
    n = x.numel()
    return x.new_empty(((n + 1) // 2,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.custom_op("lightllm::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int,
                       dtype: torch.dtype) -> torch.Tensor:
    _, impl = resolve(DEQUANTIZE, packed.device)
    return impl(packed, absmax, blocksize, quant_type, n, dtype)


@dequantize_4bit_op.register_fake
def _(packed, absmax, blocksize, quant_type, n, dtype):
    return packed.new_empty((n,), dtype=dtype)


@torch.library.custom_op("lightllm::matmul_4bit", mutates_args=())
def matmul_4bit_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                   out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    _, impl = resolve(MATMUL, x.device)
    return impl(x, packed, absmax, blocksize, quant_type, out_features, bias)


@matmul_4bit_op.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, out_features, bias = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.meta = (blocksize, quant_type, out_features, x.shape[-1], x.dtype,
                bias.dtype if bias is not None and bias.requires_grad else None)


def _matmul_backward(ctx, grad_out):
    """The input's gradient through the frozen 4-bit weight (and the bias's, when it trains)."""
    packed, absmax = ctx.saved_tensors
    blocksize, quant_type, out_features, k, dtype, bias_dtype = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = torch.ops.lightllm.dequantize_4bit(packed, absmax, blocksize, quant_type, out_features * k, dtype)
        grad_x = grad_out @ weight.view(out_features, k)
    grad_bias = grad_out.reshape(-1, out_features).sum(0).to(bias_dtype) if bias_dtype is not None else None
    return grad_x, None, None, None, None, None, grad_bias


matmul_4bit_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)
