"""Op ``lightllm::int8_linear``: an LLM.int8() layer's forward, ``y = x W^T + b`` with W stored as
per-row int8 codes CB and absmax SCB (bitsandbytes' Linear8bitLt). The reference follows
bitsandbytes 0.50 step by step: the activations are quantized per row from their float16 values
(``threshold > 0``: columns with any |x| >= threshold stay out and are multiplied in x's dtype by
the dequantized weight's same columns), the int8 product is exact in int32, scaled back by
``row * col / 127^2``, plus the bias, in x's dtype. One op so that a kernel can fuse all of it.
Backends: the reference ("torch"), the C++ CPU kernel ("cpp") and the Triton kernels ("triton",
kernels/int8.py: GPU, or CPU under TRITON_INTERPRET=1; no host synchronization at any threshold).
``lightllm::int8_lora_linear`` is LoRA on that layer, the rank-r term in the same kernels' epilogue
(see the end of this file).
"""

from __future__ import annotations

import torch

from .. import _native
from ..backends import register, resolve
from ..quantization.bnb import int8 as _int8

LINEAR = "int8_linear"


def int8_linear_reference(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                          threshold: float) -> torch.Tensor:
    a = x.reshape(-1, x.shape[-1])
    ca, sca, outlier_cols = _int8.int8_vectorwise_quant(a.to(torch.float16), threshold)
    bias = None if bias is None else bias.to(x.dtype)
    if threshold > 0.0:
        y, _ = _int8.int8_mixed_scaled_mm(a, ca, cb, sca, scb, outlier_cols, bias)
    else:
        y = _int8.int8_scaled_mm(ca, cb, sca, scb, bias=bias, dtype=x.dtype)
    return y.view(*x.shape[:-1], cb.shape[0])


def dequantized_weight(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W as the backward uses it: ``CB * (SCB / 127)`` rounded once to ``dtype``."""
    return (cb.to(dtype) * (scb.float() * (1.0 / 127.0)).unsqueeze(1)).to(dtype)


register(LINEAR, "torch", ("cpu", "cuda"))(int8_linear_reference)


# Rows of x from which the C++ backend takes the int8 product from torch._int_mm (oneDNN's GEMM)
# instead of its own GEMV; None: decided from the CPU (cpu_gemm_min_rows). Tests set it.
CPU_GEMM_MIN_ROWS: int | None = None


def cpu_gemm_min_rows() -> int:
    """Where oneDNN's int8 GEMM beats the VNNI GEMV (csrc/int8_cpu.cpp), whose passes over W take 8
    rows of x each. With AMX tiles from 9 rows: up to 8 the GEMV reads W once and wins on the large
    layers (2-core Sapphire Rapids, 4096x4096, warm: 1 row 0.34 vs 0.69 ms, 8 rows 0.56 vs 0.85 ms,
    16 rows 1.32 vs 0.94 ms); with VNNI alone above the GEMV's 16 rows; never without VNNI, where
    oneDNN's u8 x s8 products go through 16-bit sums that can saturate (0 = never)."""
    if CPU_GEMM_MIN_ROWS is not None:
        return CPU_GEMM_MIN_ROWS
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    vnni = getattr(cpu, "_is_vnni_supported", lambda: False)()
    return 9 if amx else 17 if vnni else 0


@register(LINEAR, "cpp", ("cpu",))
def _int8_linear_cpp(x, cb, scb, bias, threshold):
    """csrc/int8_cpu.cpp: the reference's bits at threshold 0 and wherever a call finds no outlier;
    with outliers, their 16-bit product is summed in float32 (the reference's up to summation order).
    The exact int32 product is the GEMV's up to cpu_gemm_min_rows() rows of x, torch._int_mm's above."""
    return _native.cpp_module().int8_linear(x, cb, scb, bias, float(threshold), gemm_min_rows=cpu_gemm_min_rows())


@register(LINEAR, "triton", ("cuda", "cpu"))
def _int8_linear_triton(x, cb, scb, bias, threshold):
    """kernels/int8.py: outlier columns found and listed on the device (no host synchronization at
    any threshold), the reference's codes, the int8 product (tl.dot, or torch._int_mm for many
    rows) and a fused epilogue; the reference's bits at threshold 0 and wherever no outlier is
    found, otherwise the outlier product summed in float32 and rounded once."""
    from ..kernels import int8 as triton_int8

    return triton_int8.int8_linear(x, cb, scb, bias, float(threshold))


@torch.library.custom_op("lightllm::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                   threshold: float) -> torch.Tensor:
    _, impl = resolve(LINEAR, x.device)
    return impl(x, cb, scb, bias, threshold)


@int8_linear_op.register_fake
def _(x, cb, scb, bias, threshold):
    return x.new_empty((*x.shape[:-1], cb.shape[0]))


def _setup(ctx, inputs, output):
    x, cb, scb, bias, threshold = inputs
    ctx.save_for_backward(cb, scb)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None


def _backward(ctx, grad_y):
    """dX through the dequantized int8 weight (as bitsandbytes); the weight is frozen here."""
    cb, scb = ctx.saved_tensors
    grad_x = grad_y.to(ctx.x_dtype) @ dequantized_weight(cb, scb, ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if ctx.bias_dtype is not None:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0, dtype=ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


int8_linear_op.register_autograd(_backward, setup_context=_setup)


# ---- LoRA on an LLM.int8 base: ``lightllm::int8_lora_linear`` ----------------------------------------
# ``(y, S)``, S = x A^T in float32 (kept for the backward pass), y = int8_linear(x) + lora_scale * S B^T:
# the rank-r term is added in the int8 kernels' epilogue (C++ and Triton), to the layer's output
# rounded to x's dtype as the reference adds it, so the int8 weight is read once. Backward: dX =
# dY W + s (dY B) A with W = CB * SCB / 127 (bitsandbytes' backward), dA and dB from S and dY
# (ops/lora.py's adapter_backward, shared with QLoRA on GPTQ and 4-bit).

LORA_LINEAR = "int8_lora_linear"


def int8_lora_linear_reference(x, cb, scb, bias, threshold: float, lora_a, lora_b, lora_scale: float):
    s = x.float() @ lora_a.float().t()
    y = int8_linear_reference(x, cb, scb, bias, threshold)
    return torch.addmm(y.float(), s, lora_b.float().t(), alpha=lora_scale).to(x.dtype), s


register(LORA_LINEAR, "torch", ("cpu", "cuda"))(int8_lora_linear_reference)


@register(LORA_LINEAR, "cpp", ("cpu",))
def _int8_lora_linear_cpp(x, cb, scb, bias, threshold, lora_a, lora_b, lora_scale):
    s = x.float() @ lora_a.float().t()
    return _native.cpp_module().int8_linear(x, cb, scb, bias, float(threshold), s, lora_b, float(lora_scale),
                                            gemm_min_rows=cpu_gemm_min_rows()), s


@register(LORA_LINEAR, "triton", ("cuda", "cpu"))
def _int8_lora_linear_triton(x, cb, scb, bias, threshold, lora_a, lora_b, lora_scale):
    from ..kernels import int8 as triton_int8
    from ..kernels import lora as triton_lora

    s = triton_lora.lora_shrink(x, lora_a)
    return triton_int8.int8_linear(x, cb, scb, bias, float(threshold), lora_s=s, lora_b=lora_b,
                                   lora_scale=lora_scale), s


@torch.library.custom_op("lightllm::int8_lora_linear", mutates_args=())
def int8_lora_linear_op(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                        threshold: float, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        lora_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)`` for x [M, K]: ``y = int8_linear(x) + lora_scale * S lora_b^T``, S = x lora_a^T (float32)."""
    _, impl = resolve(LORA_LINEAR, x.device)
    return impl(x, cb, scb, bias, threshold, lora_a, lora_b, lora_scale)


@int8_lora_linear_op.register_fake
def _(x, cb, scb, bias, threshold, lora_a, lora_b, lora_scale):
    return x.new_empty((x.shape[0], cb.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)


def _lora_setup(ctx, inputs, output):
    x, cb, scb, bias, threshold, lora_a, lora_b, lora_scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, cb, scb, lora_a, lora_b, output[1])
    ctx.scale = lora_scale
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _lora_backward(ctx, grad_y, _grad_s):
    from . import lora as ops_lora

    x, cb, scb, lora_a, lora_b, s = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db = ops_lora.adapter_backward(grad_y, x, lambda: dequantized_weight(cb, scb, grad_y.dtype), lora_a,
                                           lora_b, s, ctx.scale, need[0], need[5], need[6])
    if dx is not None:
        dx = dx.to(x.dtype)
    dbias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need[3] else None
    return dx, None, None, dbias, None, da, db, None


int8_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


def int8_lora_linear(x, cb, scb, bias, threshold: float, lora_a, lora_b, lora_scale: float) -> torch.Tensor:
    """y of ``torch.ops.lightllm.int8_lora_linear`` for x [..., K] after the adapter's checks, minus
    the custom op's Python dispatch when nothing needs the op boundary (eager inference)."""
    from . import lora as ops_lora
    from ._dispatch import call_op

    n, k = cb.shape
    if x.shape[-1] != k:
        raise ValueError(f"{LORA_LINEAR}: x has {x.shape[-1]} features, CB of shape {tuple(cb.shape)} takes {k}")
    x2 = x.reshape(-1, k)
    ops_lora.check_adapter(LORA_LINEAR, x2, n, lora_a, lora_b)
    y = call_op(torch.ops.lightllm.int8_lora_linear, LORA_LINEAR,
                (x2, cb, scb, bias, threshold, lora_a, lora_b, lora_scale), x2, bias, lora_a, lora_b)[0]
    return y.view(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """``torch.ops.lightllm.int8_linear``, minus the custom op's Python dispatch when nothing needs the
    op boundary (eager inference: decoding); autograd, torch.compile and dispatch modes get the op."""
    from ._dispatch import call_op

    return call_op(torch.ops.lightllm.int8_linear, LINEAR, (x, cb, scb, bias, threshold), x, bias)
