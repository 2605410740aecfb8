"""Ops ``lightllm::gptq_dequantize`` and ``lightllm::gptq_matmul`` over GPTQ-format tensors.

``gptq_matmul(x [M, K], ...) = x @ W^T + bias + lora_scale * lora_s @ lora_b^T`` with
``W = gptq_dequantize(...)`` in x's dtype, the weight frozen (autograd gives the input's gradient
only). The optional rank-r epilogue (``lora_s`` [M, r] in float32, ``lora_b`` [N, r]) lets LoRA on a
quantized layer read the packed weight once: it is added in float32 before the single rounding
to x's dtype. The reference dequantizes then calls
``F.linear``: that is cuBLAS on the dequantized weight, the accuracy bar for the fused kernels.
Backends: the reference; Triton (kernels/gptq.py: a dequant-matmul, and a dequantize kernel that
serves the backward pass, ``QuantLinear.dequantize`` and the large-M dequantize + cuBLAS path); CUDA
(csrc/gptq.cu: a small-M GEMV on the checkpoint layout, dequantize + cuBLAS above 8 rows).
"""

from __future__ import annotations

import torch

from .. import _native
from ..backends import register, resolve
from ..quantization.gptq_format import dequantize_gptq

DEQUANTIZE = "gptq_dequantize"
MATMUL = "gptq_matmul"


def _checkpoint_format(zeros_v1: bool) -> str:
    return "gptq" if zeros_v1 else "gptq_v2"


# ---- reference ------------------------------------------------------------------------------

def gptq_dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, zeros_v1: bool, dtype: torch.dtype):
    return dequantize_gptq(qweight, qzeros, scales, g_idx, bits, _checkpoint_format(zeros_v1), dtype)


def dense_matmul(x, weight, bias, lora_s, lora_b, lora_scale: float):
    """``x @ weight^T + bias + lora_scale * lora_s @ lora_b^T`` with cuBLAS; the rank-r term and the
    bias are added in float32 before one rounding to x's dtype."""
    if lora_s is None:
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    y = torch.nn.functional.linear(x, weight).float() + lora_scale * (lora_s.float() @ lora_b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale: float, bits: int,
                          zeros_v1: bool):
    weight = gptq_dequantize_reference(qweight, qzeros, scales, g_idx, bits, zeros_v1, x.dtype)
    return dense_matmul(x, weight, bias, lora_s, lora_b, lora_scale)


register(DEQUANTIZE, "torch", ("cpu", "cuda"))(gptq_dequantize_reference)
register(MATMUL, "torch", ("cpu", "cuda"))(gptq_matmul_reference)


@register(DEQUANTIZE, "cuda", ("cuda",))
def _gptq_dequantize_cuda(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    return _native.native_module().gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@register(MATMUL, "cuda", ("cuda",))
def _gptq_matmul_cuda(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1):
    return _native.native_module().gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale,
                                               bits, zeros_v1)


@register(DEQUANTIZE, "triton", ("cuda", "cpu"))
def _gptq_dequantize_triton(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype):
    from ..kernels import gptq as triton_gptq

    return triton_gptq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, dtype)


@register(MATMUL, "triton", ("cuda", "cpu"))
def _gptq_matmul_triton(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1):
    from ..kernels import gptq as triton_gptq

    # From DEQUANTIZE_THEN_GEMM_ROWS rows on the GEMM is compute-bound and the weight read amortized:
    # dequantize once into a dense buffer and let cuBLAS do the GEMM.
    if x.is_cuda and x.shape[0] >= triton_gptq.DEQUANTIZE_THEN_GEMM_ROWS and qweight.shape[1] > 0:
        weight = triton_gptq.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, x.dtype)
        return dense_matmul(x, weight, bias, lora_s, lora_b, lora_scale)
    return triton_gptq.gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, bits, zeros_v1, lora_s, lora_b, lora_scale)


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
                   g_idx: torch.Tensor, bias: torch.Tensor | None, lora_s: torch.Tensor | None,
                   lora_b: torch.Tensor | None, lora_scale: float, bits: int, zeros_v1: bool) -> torch.Tensor:
    _, impl = resolve(MATMUL, x.device)
    return impl(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1)


@gptq_matmul_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _setup_context(ctx, inputs, output):
    x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1 = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)
    ctx.bits, ctx.zeros_v1, ctx.x_dtype = bits, zeros_v1, x.dtype


def _backward(ctx, grad_out):
    if any(ctx.needs_input_grad[5:8]):
        raise NotImplementedError("gptq_matmul: gradients of bias, lora_s and lora_b are not implemented "
                                  "(the quantized layer's own tensors are frozen)")
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = torch.ops.lightllm.gptq_dequantize(qweight, qzeros, scales, g_idx, ctx.bits, ctx.zeros_v1, grad_out.dtype)
        grad_x = (grad_out @ weight).to(ctx.x_dtype)
    return (grad_x,) + (None,) * 10


gptq_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the eager fast path ----------------------------------------------------------------------

def _op_boundary_needed(x: torch.Tensor) -> bool:
    """True when the call must go through the custom op: autograd, tracing or a dispatch mode."""
    if torch.is_grad_enabled() and x.requires_grad:
        return True
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._len_torch_dispatch_stack() > 0  # FakeTensorMode, FlopCounterMode, ...
    except AttributeError:  # a torch without this probe: stay on the safe side
        return True


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale: float, bits: int,
                zeros_v1: bool) -> torch.Tensor:
    """``torch.ops.lightllm.gptq_matmul``, minus the custom op's Python dispatch (about 6 us a call)
    when nothing needs the op boundary: decode steps in eager inference call the kernel directly."""
    if _op_boundary_needed(x):
        return torch.ops.lightllm.gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale,
                                              bits, zeros_v1)
    _, impl = resolve(MATMUL, x.device)
    return impl(x, qweight, qzeros, scales, g_idx, bias, lora_s, lora_b, lora_scale, bits, zeros_v1)
