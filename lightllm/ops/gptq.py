"""Ops ``lightllm::gptq_dequantize``, ``lightllm::gptq_matmul`` and ``lightllm::gptq_lora_linear``
over GPTQ-format tensors.

``gptq_matmul(x [M, K], ...) = x @ W^T + bias + lora_scale * S @ lora_b^T`` with
``W = gptq_dequantize(...)`` in x's dtype, the weight frozen (autograd gives the input's gradient
only). The optional rank-r epilogue lets LoRA on a quantized layer read the packed weight once: S is
either given (``lora_s`` [M, r], float32) or computed in the kernel from ``lora_a`` [r, K] as
S = x A^T (the decode path: one launch for the whole layer); it is added in float32 before the
single rounding to x's dtype. The reference dequantizes then calls ``F.linear``: that is cuBLAS on
the dequantized weight, the accuracy bar for the fused kernels.
Backends: the reference; Triton (kernels/gptq.py: a dequant-matmul, and a dequantize kernel that
serves the backward pass, ``QuantLinear.dequantize`` and the large-M dequantize + GEMM path); CUDA
(csrc/gptq.cu: a small-M GEMV on the checkpoint layout, one launch with the rank-r term and the
bias, dequantize + cuBLAS above 8 rows); C++ on the CPU (csrc/gptq_cpu.cpp, the CPU default: a GEMV
reading the packed weight once per 16 rows, AVX-512 (bf16 dot products where the CPU has them) or
AVX2 chosen at run time, up to 256 rows;
dequantize to float32 + torch's GEMM above; the rank-r term from torch, added before the rounding).

``gptq_lora_linear`` is QLoRA's training op: ``(y, S)`` with gradients for x, A and B; its backward
dequantizes W only to form dX = dY W + s (dY B) A (ops/lora.py).
"""

from __future__ import annotations

import torch

from .. import _native
from ..backends import register, resolve
from ..quantization.gptq.format import dequantize_gptq
from . import lora as ops_lora
from ._dispatch import op_boundary_needed

DEQUANTIZE = "gptq_dequantize"
MATMUL = "gptq_matmul"


def _checkpoint_format(zeros_v1: bool) -> str:
    return "gptq" if zeros_v1 else "gptq_v2"


# ---- reference ------------------------------------------------------------------------------

def gptq_dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, zeros_v1: bool, dtype: torch.dtype):
    return dequantize_gptq(qweight, qzeros, scales, g_idx, bits, _checkpoint_format(zeros_v1), dtype)


def gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale: float,
                          bits: int, zeros_v1: bool):
    weight = gptq_dequantize_reference(qweight, qzeros, scales, g_idx, bits, zeros_v1, x.dtype)
    if lora_s is None and lora_a is not None:
        lora_s = ops_lora.lora_shrink_reference(x, lora_a)
    return ops_lora.lora_matmul_reference(x, weight, bias, lora_s, lora_b, lora_scale)


register(DEQUANTIZE, "torch", ("cpu", "cuda"))(gptq_dequantize_reference)
register(MATMUL, "torch", ("cpu", "cuda"))(gptq_matmul_reference)


@register(DEQUANTIZE, "cuda", ("cuda",))
def _gptq_dequantize_cuda(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    return _native.cuda_module().gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@register(MATMUL, "cuda", ("cuda",))
def _gptq_matmul_cuda(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1):
    return _native.cuda_module().gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b,
                                             lora_scale, bits, zeros_v1)


@register(DEQUANTIZE, "cpp", ("cpu",))
def _gptq_dequantize_cpp(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    return _native.cpp_module().gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@register(MATMUL, "cpp", ("cpu",))
def _gptq_matmul_cpp(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1):
    # All in C++ (csrc/gptq_cpu.cpp): the GEMV up to 256 rows (one pass over the weight per 16 rows);
    # above, its own dequantization to float32 and torch's GEMM. The rank-r term S B^T is computed by torch in float32 and added in the GEMV's
    # epilogue, before the one rounding.
    return _native.cpp_module().gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b,
                                            lora_scale, bits, zeros_v1)


@register(DEQUANTIZE, "triton", ("cuda", "cpu"))
def _gptq_dequantize_triton(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    from ..kernels import gptq as triton_gptq

    return triton_gptq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@register(MATMUL, "triton", ("cuda", "cpu"))
def _gptq_matmul_triton(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1):
    from ..kernels import gptq as triton_gptq
    from ..kernels import lora as triton_lora

    # From DEQUANTIZE_THEN_GEMM_ROWS rows on the GEMM is compute-bound and the weight read amortized:
    # dequantize once into a dense buffer and run the dense GEMM (with the rank-r epilogue when
    # there is an adapter, cuBLAS otherwise).
    if x.is_cuda and x.shape[0] >= triton_gptq.DEQUANTIZE_THEN_GEMM_ROWS and qweight.shape[1] > 0:
        weight = triton_gptq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, x.dtype)
        if lora_s is None and lora_a is not None:
            lora_s = triton_lora.lora_shrink(x, lora_a)
        if lora_s is None:
            return ops_lora.lora_matmul_reference(x, weight, bias, None, None, 0.0)
        return triton_lora.lora_matmul(x, weight, bias, lora_s, lora_b, lora_scale)
    return triton_gptq.gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, bits, zeros_v1, lora_a=lora_a,
                                   lora_s=lora_s, lora_b=lora_b, lora_scale=lora_scale)


# ---- the custom ops -------------------------------------------------------------------------

@torch.library.custom_op("lightllm::gptq_dequantize", mutates_args=())
def gptq_dequantize_op(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, zeros_v1: bool, dtype: torch.dtype) -> torch.Tensor:
    _, impl = resolve(DEQUANTIZE, qweight.device)
    return impl(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@gptq_dequantize_op.register_fake
def _(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    return qweight.new_empty((qweight.shape[1], g_idx.shape[0]), dtype=dtype)


@torch.library.custom_op("lightllm::gptq_matmul", mutates_args=())
def gptq_matmul_op(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                   lora_s: torch.Tensor | None, lora_b: torch.Tensor | None, lora_scale: float, bits: int,
                   zeros_v1: bool) -> torch.Tensor:
    _, impl = resolve(MATMUL, x.device)
    return impl(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1)


@gptq_matmul_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _setup_context(ctx, inputs, output):
    x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1 = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)
    ctx.bits, ctx.zeros_v1, ctx.x_dtype = bits, zeros_v1, x.dtype


def _backward(ctx, grad_out):
    if any(ctx.needs_input_grad[5:9]):
        raise NotImplementedError("gptq_matmul: gradients of bias and of the rank-r term are not implemented "
                                  "(train LoRA on a quantized layer with gptq_lora_linear)")
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = torch.ops.lightllm.gptq_dequantize(qweight, qzeros, scales, g_idx, ctx.bits, ctx.zeros_v1, grad_out.dtype)
        grad_x = (grad_out @ weight).to(ctx.x_dtype)
    return (grad_x,) + (None,) * 11


gptq_matmul_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lightllm::gptq_lora_linear", mutates_args=())
def gptq_lora_linear_op(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        g_idx: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        lora_scale: float, bits: int, zeros_v1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S): S = x A^T in float32 (kept for the backward pass), then y with S in the epilogue."""
    _, shrink = resolve(ops_lora.SHRINK, x.device)
    s = shrink(x, lora_a)
    _, matmul = resolve(MATMUL, x.device)
    return matmul(x, qweight, qzeros, scales, g_idx, bias, None, s, lora_b, lora_scale, bits, zeros_v1), s


@gptq_lora_linear_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, lora_scale, bits, zeros_v1):
    return x.new_empty((x.shape[0], qweight.shape[1])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)


def _lora_setup_context(ctx, inputs, output):
    x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, lora_scale, bits, zeros_v1 = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, qweight, qzeros, scales, g_idx, lora_a, lora_b, output[1])
    ctx.bits, ctx.zeros_v1, ctx.scale = bits, zeros_v1, lora_scale


def _lora_backward(ctx, grad_y, _grad_s):
    if ctx.needs_input_grad[5]:
        raise NotImplementedError("gptq_lora_linear: the quantized layer's bias is frozen (a buffer)")
    x, qweight, qzeros, scales, g_idx, lora_a, lora_b, s = ctx.saved_tensors
    need = ctx.needs_input_grad

    def dense_weight():
        return torch.ops.lightllm.gptq_dequantize(qweight, qzeros, scales, g_idx, ctx.bits, ctx.zeros_v1, grad_y.dtype)

    dx, da, db = ops_lora.adapter_backward(grad_y, x, dense_weight, lora_a, lora_b, s, ctx.scale, need[0], need[6],
                                           need[7])
    return (dx, None, None, None, None, None, da, db, None, None, None)


gptq_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup_context)


# ---- the eager fast path ----------------------------------------------------------------------

def _op_boundary_needed(x: torch.Tensor) -> bool:
    """True when the call must go through the custom op: autograd, tracing or a dispatch mode."""
    return op_boundary_needed(x)


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale: float, bits: int,
                zeros_v1: bool) -> torch.Tensor:
    """``torch.ops.lightllm.gptq_matmul``, minus the custom op's Python dispatch (about 6 us a call)
    when nothing needs the op boundary: decode steps in eager inference call the kernel directly."""
    if op_boundary_needed(x, lora_a, lora_s, lora_b):
        return torch.ops.lightllm.gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b,
                                              lora_scale, bits, zeros_v1)
    _, impl = resolve(MATMUL, x.device)
    return impl(x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_s, lora_b, lora_scale, bits, zeros_v1)
