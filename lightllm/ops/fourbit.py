"""Ops ``lightllm::quantize_4bit``, ``lightllm::dequantize_4bit``, ``lightllm::matmul_4bit`` and
``lightllm::fourbit_lora_linear`` (LoRA on a 4-bit base, QLoRA: see the end of this file):
bitsandbytes' 4-bit NF4 / FP4 format (QLoRA's), defined here by the reference; every backend
quantizes and dequantizes bit for bit as it does (the matmuls agree within rounding: the fused LoRA
GEMV up to 16 rows rounds y once, the reference rounds the base product before adding the LoRA term).

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
* Double quantization: ``matmul_4bit`` also takes the absmax as uint8 codes with the nested state
  (``nested_absmax``, ``nested_code``, ``nested_blocksize``, ``nested_offset``), decoded as
  ``QuantState.float_absmax`` does; the GPU kernels decode it in place.

Backends: the reference; C++ on the CPU (csrc/fourbit_cpu.cpp); Triton (kernels/fourbit.py) and CUDA
(csrc/fourbit.cu), each a GEMV up to 16 rows of x and dequantize + cuBLAS above (not yet run on a GPU).
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
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    # index_select with int32 indices: the same gather as table[codes.long()] without the int64 copy
    # of every index (several times faster on the CPU)
    values = code_table(quant_type, packed.device).index_select(0, codes.int())
    if n % blocksize == 0:
        return (values.view(-1, blocksize) * absmax.float().view(-1, 1)).view(-1).to(dtype)
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def decode_nested_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                         nested_blocksize: int, nested_offset: torch.Tensor | None) -> torch.Tensor:
    """The per-block absmax in float32: ``absmax`` itself, or, double-quantized (``nested_absmax``
    given), its uint8 codes decoded as ``QuantState.float_absmax`` does: ``nested_code[c] *
    nested_absmax[i // nested_blocksize]`` in float32, then ``+ nested_offset`` (a float32 scalar)."""
    if nested_absmax is None:
        return absmax
    from .blockwise import dequantize_blockwise_reference

    decoded = dequantize_blockwise_reference(absmax.reshape(-1), nested_absmax.reshape(-1), nested_code,
                                             nested_blocksize, torch.float32)
    return decoded + nested_offset.to(decoded.device)


def _decode_nested_absmax_cpp(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset):
    """:func:`decode_nested_absmax` for the C++ backends: the codes decoded by csrc's block-wise
    dequantization (the reference's ``code[c] * absmax`` in float32, bit for bit: its tests) instead
    of torch's gather, whose int64 index copy made the decode cost several times the 4-bit GEMV of a
    double-quantized layer at M = 1. Settings that kernel does not take go through the reference."""
    if nested_absmax is None:
        return absmax
    nb = nested_blocksize
    if (64 <= nb <= 4096 and nb & (nb - 1) == 0 and absmax.dtype == torch.uint8 and nested_code.dtype == torch.float32
            and nested_code.numel() == 256 and nested_absmax.dtype == torch.float32):
        decoded = _native.cpp_module().dequantize_blockwise(absmax.reshape(-1), nested_absmax.reshape(-1),
                                                           nested_code.reshape(-1), nb, torch.float32)
        return decoded + nested_offset.to(decoded.device)
    return decode_nested_absmax(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                          quant_type: str, out_features: int, bias: torch.Tensor | None,
                          nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                          nested_blocksize: int = 256, nested_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for the 4-bit weight W [out_features, K], in x's dtype (W rounded to it).
    Double-quantized (``nested_absmax`` given): ``absmax`` holds the uint8 codes of the block absmax,
    decoded first by :func:`decode_nested_absmax`."""
    absmax = decode_nested_absmax(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)
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
def _matmul_cpp(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None, nested_code=None,
                nested_blocksize=256, nested_offset=None):
    # double quantization: the absmax decoded first (the reference's bits), then the kernel
    absmax = _decode_nested_absmax_cpp(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)
    return _native.cpp_module().matmul_4bit(x, packed.reshape(-1), absmax, _code_cpu(quant_type), blocksize,
                                            out_features, bias)


# ---- argument checks of the GPU backends (the C++ ones check in csrc/bindings_bnb.cpp) ------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.int64: "Long",
            torch.int32: "Int", torch.uint8: "Byte", torch.int8: "Char", torch.float64: "Double"}.get(dtype, str(dtype))


def check_4bit_args(op: str, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int,
                    nested: tuple | None, device: torch.device, exact: bool = True) -> None:
    """ValueError naming what is wrong: the blocksize, quant type, the packed bytes' dtype and count
    (``ceil(n / 2)``; at least that many when not ``exact``, as for dequantize_4bit), the absmax's
    dtype and length (likewise), the double-quantization state, devices."""
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: blocksize must be a power of two from 32 to 4096, got {blocksize}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{op}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"{op}: packed must be uint8 bytes, got {_dtype_name(packed.dtype)}")
    if packed.numel() != (n + 1) // 2 if exact else packed.numel() < (n + 1) // 2:
        raise ValueError(f"{op}: packed holds {packed.numel()} bytes; {n} 4-bit values need {(n + 1) // 2}")
    blocks = -(-n // blocksize)
    if nested is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"{op}: absmax must be float32, got {_dtype_name(absmax.dtype)}")
    else:
        nested_absmax, nested_code, nested_blocksize, nested_offset = nested
        if absmax.dtype != torch.uint8:
            raise ValueError(f"{op}: double-quantized absmax must be uint8 codes, got {_dtype_name(absmax.dtype)}")
        if nested_code is None or nested_offset is None:
            raise ValueError(f"{op}: double quantization needs nested_absmax, nested_code and nested_offset")
        if not isinstance(nested_blocksize, int) or nested_blocksize < 1:
            raise ValueError(f"{op}: nested_blocksize must be a positive int, got {nested_blocksize!r}")
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-blocks // nested_blocksize):
            raise ValueError(f"{op}: nested_absmax must hold {-(-blocks // nested_blocksize)} float32 values for "
                             f"{blocks} absmax codes at nested_blocksize {nested_blocksize}, got "
                             f"{nested_absmax.numel()} {_dtype_name(nested_absmax.dtype)}")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"{op}: nested_code must be the 256 float32 values of the 8-bit map, got "
                             f"{nested_code.numel()} {_dtype_name(nested_code.dtype)}")
        if nested_offset.numel() != 1 or not nested_offset.is_floating_point():
            raise ValueError(f"{op}: nested_offset must be one float, got shape {tuple(nested_offset.shape)}")
        for name, t in (("nested_absmax", nested_absmax), ("nested_code", nested_code),
                        ("nested_offset", nested_offset)):
            if t.device != device:
                raise ValueError(f"{op}: {name} is on {t.device}, x on {device}")
    if absmax.numel() != blocks if exact else absmax.numel() < blocks:
        raise ValueError(f"{op}: absmax holds {absmax.numel()} values; {n} values at blocksize {blocksize} need "
                         f"{blocks}")
    for name, t in (("packed", packed), ("absmax", absmax)):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")


def check_matmul_args(x, packed, absmax, blocksize, quant_type, out_features, bias, nested) -> None:
    op = MATMUL
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16, got {_dtype_name(x.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    if not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"{op}: out_features must be >= 0, got {out_features}")
    check_4bit_args(op, packed, absmax, blocksize, quant_type, out_features * x.shape[-1], nested, x.device)
    if bias is not None:
        if bias.dtype not in _FLOATS:
            raise ValueError(f"{op}: bias must be float32, float16 or bfloat16, got {_dtype_name(bias.dtype)}")
        if bias.numel() != out_features:
            raise ValueError(f"{op}: bias has {bias.numel()} values, the layer has {out_features} outputs")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device}, x on {x.device}")


def _nested(nested_absmax, nested_code, nested_blocksize, nested_offset) -> tuple | None:
    return None if nested_absmax is None else (nested_absmax, nested_code, nested_blocksize, nested_offset)


# ---- Triton (kernels/fourbit.py): on CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 ----------
# matmul: a GEMV up to 16 rows of x (K even), the absmax decoded in the kernel when double-quantized;
# otherwise the Triton dequantization (the reference's bits) + torch's matmul (cuBLAS).

@register(DEQUANTIZE, "triton", ("cuda", "cpu"))
def _dequantize_triton(packed, absmax, blocksize, quant_type, n, dtype):
    from ..kernels import fourbit as triton_fourbit

    if dtype not in _FLOATS + (torch.float64,):
        raise ValueError(f"{DEQUANTIZE}: dtype must be float32, float16 or bfloat16, got {dtype}")
    if n < 0:
        raise ValueError(f"{DEQUANTIZE}: n must be >= 0, got {n}")
    check_4bit_args(DEQUANTIZE, packed.reshape(-1), absmax, blocksize, quant_type, n, None, packed.device,
                    exact=False)
    return triton_fourbit.dequantize_4bit(packed, absmax, blocksize, quant_type, n, dtype)


def _dense_matmul(dequantize, x2, packed, absmax, blocksize, quant_type, out_features, bias, nested):
    k = x2.shape[-1]
    weight = dequantize(packed, absmax, blocksize, quant_type, out_features * k, x2.dtype, nested)
    return torch.nn.functional.linear(x2, weight.view(out_features, k), None if bias is None else bias.to(x2.dtype))


@register(MATMUL, "triton", ("cuda", "cpu"))
def _matmul_triton(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None,
                   nested_code=None, nested_blocksize=256, nested_offset=None):
    from ..kernels import fourbit as triton_fourbit

    nested = _nested(nested_absmax, nested_code, nested_blocksize, nested_offset)
    check_matmul_args(x, packed, absmax, blocksize, quant_type, out_features, bias, nested)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= triton_fourbit.GEMV_MAX_ROWS and k % 2 == 0 and k > 0:
        y = triton_fourbit.matmul_4bit(x2, packed, absmax, blocksize, quant_type, out_features, bias, nested)
    else:
        y = _dense_matmul(triton_fourbit.dequantize_4bit, x2, packed, absmax, blocksize, quant_type, out_features,
                          bias, nested)
    return y.view(*x.shape[:-1], out_features)


# ---- CUDA (csrc/fourbit.cu): the same split, the checks in csrc/bindings_cuda.cpp ----------------------

@register(DEQUANTIZE, "cuda", ("cuda",))
def _dequantize_cuda(packed, absmax, blocksize, quant_type, n, dtype):
    return _native.cuda_module().dequantize_4bit(packed.reshape(-1), absmax, None, None, 256, None,
                                                 code_table_on(quant_type, packed.device), blocksize, n, dtype)


@register(MATMUL, "cuda", ("cuda",))
def _matmul_cuda(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None, nested_code=None,
                 nested_blocksize=256, nested_offset=None):
    return _native.cuda_module().matmul_4bit(x, packed.reshape(-1), absmax, nested_absmax, nested_code,
                                             nested_blocksize, nested_offset, code_table_on(quant_type, x.device),
                                             blocksize, out_features, bias)


@functools.lru_cache(maxsize=None)
def code_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-value table of ``quant_type`` on ``device``, one cached copy per device (kernels only
    read it)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return _code_cpu(quant_type).to(device)


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
                   out_features: int, bias: torch.Tensor | None, nested_absmax: torch.Tensor | None = None,
                   nested_code: torch.Tensor | None = None, nested_blocksize: int = 256,
                   nested_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias``. With double quantization pass the raw state: ``absmax`` the uint8 codes,
    ``nested_absmax`` (float32, one per ``nested_blocksize`` codes), ``nested_code`` (the 256-value
    map) and ``nested_offset`` (float32 scalar tensor: no host sync); kernels decode it in place."""
    _, impl = resolve(MATMUL, x.device)
    return impl(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax, nested_code,
                nested_blocksize, nested_offset)


@matmul_4bit_op.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None, nested_code=None,
      nested_blocksize=256, nested_offset=None):
    return x.new_empty((*x.shape[:-1], out_features))


def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax, nested_code, nested_blocksize, \
        nested_offset = inputs
    nested = nested_absmax is not None
    ctx.save_for_backward(packed, absmax, *((nested_absmax, nested_code, nested_offset) if nested else ()))
    ctx.meta = (blocksize, quant_type, out_features, x.shape[-1], x.dtype,
                bias.dtype if bias is not None and bias.requires_grad else None, nested_blocksize)


def _matmul_backward(ctx, grad_out):
    """The input's gradient through the frozen 4-bit weight (and the bias's, when it trains)."""
    packed, absmax, *nested = ctx.saved_tensors
    blocksize, quant_type, out_features, k, dtype, bias_dtype, nested_blocksize = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:
        if nested:
            absmax = decode_nested_absmax(absmax, nested[0], nested[1], nested_blocksize, nested[2])
        weight = torch.ops.lightllm.dequantize_4bit(packed, absmax, blocksize, quant_type, out_features * k, dtype)
        grad_x = grad_out @ weight.view(out_features, k)
    grad_bias = grad_out.reshape(-1, out_features).sum(0).to(bias_dtype) if bias_dtype is not None else None
    return grad_x, None, None, None, None, None, grad_bias, None, None, None, None


matmul_4bit_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


def nested_args(state) -> tuple:
    """The trailing ``matmul_4bit`` arguments for a QuantState: its raw double-quantization state when
    nested (the kernels decode the absmax codes themselves), else none."""
    if not state.nested:
        return ()
    return (state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset.float().reshape(()))


# ---- LoRA on a 4-bit base (QLoRA): ``lightllm::fourbit_lora_linear`` -----------------------------------
# ``(y, S)`` with S = x A^T (float32, kept for the backward pass) and
# ``y = x W^T + bias + lora_scale * S B^T``: the packed weight is read once, the rank-r term added in
# the GEMV's epilogue before the one rounding to x's dtype (C++ and Triton, up to 16 rows of x;
# above, dequantize once and a GEMM whose epilogue adds it: the Triton lora_matmul kernel, or torch on
# the CPU). Backward: dX = dY W + s (dY B) A with W dequantized only when dX is needed, dA and dB from
# S and dY (ops/lora.py's adapter_backward, shared with QLoRA on GPTQ). No CUDA kernel of its own yet:
# on a GPU the reference (dequantize + cuBLAS) or the Triton kernels serve.

LORA_LINEAR = "fourbit_lora_linear"


def fourbit_lora_linear_reference(x, packed, absmax, blocksize: int, quant_type: str, out_features: int, bias,
                                  lora_a, lora_b, lora_scale: float, nested_absmax=None, nested_code=None,
                                  nested_blocksize: int = 256, nested_offset=None):
    """Dequantize (the reference's bits), ``F.linear`` in x's dtype, then the rank-r term added in
    float32 (PEFT's arithmetic on bitsandbytes' layer)."""
    from . import lora as ops_lora

    absmax = decode_nested_absmax(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)
    k = x.shape[-1]
    weight = dequantize_4bit_reference(packed, absmax, blocksize, quant_type, out_features * k, x.dtype)
    s = ops_lora.lora_shrink_reference(x, lora_a)
    return ops_lora.lora_matmul_reference(x, weight.view(out_features, k), bias, s, lora_b, lora_scale), s


register(LORA_LINEAR, "torch", ("cpu", "cuda"))(fourbit_lora_linear_reference)


@register(LORA_LINEAR, "cpp", ("cpu",))
def _lora_linear_cpp(x, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale,
                     nested_absmax=None, nested_code=None, nested_blocksize=256, nested_offset=None):
    # S by torch (an [M, K] x [K, r] product, small next to the weight), then csrc/fourbit_cpu.cpp's
    # GEMV with S B^T in its epilogue (above 16 rows: its dequantization, torch's GEMM, S B^T added)
    absmax = _decode_nested_absmax_cpp(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)
    s = x.float() @ lora_a.float().t()
    y = _native.cpp_module().matmul_4bit(x, packed.reshape(-1), absmax, _code_cpu(quant_type), blocksize, out_features,
                                         bias, s, lora_b, float(lora_scale))
    return y, s


@register(LORA_LINEAR, "triton", ("cuda", "cpu"))
def _lora_linear_triton(x, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale,
                        nested_absmax=None, nested_code=None, nested_blocksize=256, nested_offset=None):
    from ..kernels import fourbit as triton_fourbit
    from ..kernels import lora as triton_lora

    nested = _nested(nested_absmax, nested_code, nested_blocksize, nested_offset)
    check_matmul_args(x, packed, absmax, blocksize, quant_type, out_features, bias, nested)
    k = x.shape[-1]
    s = triton_lora.lora_shrink(x, lora_a)
    if x.shape[0] <= triton_fourbit.GEMV_MAX_ROWS and k % 2 == 0 and k > 0:
        y = triton_fourbit.matmul_4bit(x, packed, absmax, blocksize, quant_type, out_features, bias, nested,
                                       lora_s=s, lora_b=lora_b, lora_scale=lora_scale)
        return y, s
    weight = triton_fourbit.dequantize_4bit(packed, absmax, blocksize, quant_type, out_features * k, x.dtype, nested)
    return triton_lora.lora_matmul(x, weight.view(out_features, k), bias, s, lora_b, lora_scale), s


@torch.library.custom_op("lightllm::fourbit_lora_linear", mutates_args=())
def fourbit_lora_linear_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                           quant_type: str, out_features: int, bias: torch.Tensor | None, lora_a: torch.Tensor,
                           lora_b: torch.Tensor, lora_scale: float, nested_absmax: torch.Tensor | None = None,
                           nested_code: torch.Tensor | None = None, nested_blocksize: int = 256,
                           nested_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)`` for x [M, K]: ``y = x W^T + bias + lora_scale * S lora_b^T``, S = x lora_a^T in
    float32; W the 4-bit weight [out_features, K] (double quantization as in ``matmul_4bit``)."""
    _, impl = resolve(LORA_LINEAR, x.device)
    return impl(x, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale,
                nested_absmax, nested_code, nested_blocksize, nested_offset)


@fourbit_lora_linear_op.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale, nested_absmax=None,
      nested_code=None, nested_blocksize=256, nested_offset=None):
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32))


def _lora_setup(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale, nested_absmax,
     nested_code, nested_blocksize, nested_offset) = inputs
    ctx.mark_non_differentiable(output[1])
    nested = nested_absmax is not None
    ctx.save_for_backward(x, lora_a, lora_b, output[1], packed, absmax,
                          *((nested_absmax, nested_code, nested_offset) if nested else ()))
    ctx.meta = (blocksize, quant_type, out_features, nested_blocksize, lora_scale,
                bias.dtype if bias is not None else None)


def _lora_backward(ctx, grad_y, _grad_s):
    from . import lora as ops_lora

    x, lora_a, lora_b, s, packed, absmax, *nested = ctx.saved_tensors
    blocksize, quant_type, out_features, nested_blocksize, scale, bias_dtype = ctx.meta
    need = ctx.needs_input_grad
    k = x.shape[-1]

    def dense_weight():  # only for dX: the one pass over the packed weight the backward makes
        scales = absmax if not nested else decode_nested_absmax(absmax, nested[0], nested[1], nested_blocksize,
                                                                nested[2])
        w = torch.ops.lightllm.dequantize_4bit(packed, scales, blocksize, quant_type, out_features * k, grad_y.dtype)
        return w.view(out_features, k)

    dx, da, db = ops_lora.adapter_backward(grad_y, x, dense_weight, lora_a, lora_b, s, scale, need[0], need[7],
                                           need[8])
    if dx is not None:
        dx = dx.to(x.dtype)
    dbias = grad_y.sum(0, dtype=torch.float32).to(bias_dtype) if need[6] else None
    return dx, None, None, None, None, None, dbias, da, db, None, None, None, None, None


fourbit_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


def fourbit_lora_linear(x, packed, absmax, blocksize: int, quant_type: str, out_features: int, bias, lora_a, lora_b,
                        lora_scale: float, *nested) -> torch.Tensor:
    """y of ``torch.ops.lightllm.fourbit_lora_linear`` for x [..., K] after the adapter's checks,
    minus the custom op's Python dispatch when nothing needs the op boundary (eager inference)."""
    from . import lora as ops_lora
    from ._dispatch import call_op

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    ops_lora.check_adapter(LORA_LINEAR, x2, out_features, lora_a, lora_b)
    check_matmul_args(x2, packed, absmax, blocksize, quant_type, out_features, bias, _nested(*nested) if nested else None)
    y = call_op(torch.ops.lightllm.fourbit_lora_linear, LORA_LINEAR,
                (x2, packed, absmax, blocksize, quant_type, out_features, bias, lora_a, lora_b, lora_scale, *nested),
                x2, bias, lora_a, lora_b)[0]
    return y.view(*x.shape[:-1], out_features)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                out_features: int, bias: torch.Tensor | None, *nested) -> torch.Tensor:
    """``torch.ops.lightllm.matmul_4bit`` for x [M, K], minus the custom op's Python dispatch (tens of
    microseconds, more than the kernel of a small layer at M = 1) when nothing needs the op boundary:
    eager inference, what decoding runs. Autograd, torch.compile and dispatch modes get the op."""
    from ._dispatch import call_op

    return call_op(torch.ops.lightllm.matmul_4bit, MATMUL,
                   (x, packed, absmax, blocksize, quant_type, out_features, bias, *nested), x, bias)
