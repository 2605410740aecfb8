"""Ops of LoRA on a dense base layer: ``y = x W^T + bias + scale * (x A^T) B^T``.

Shapes: x [M, K] (tokens, in_features), W [N, K] (any strides), bias [N], A [r, K], B [N, r].
x and W share one float dtype; bias and the adapters may be any float dtype (PEFT keeps adapters
in float32). S = x A^T is computed and kept in float32, and the rank-r term and the bias are added
to the float32 accumulator before the one rounding to x's dtype: no fp32 copy of x, no second pass
over y.

* ``lightllm::lora_linear(x, W, bias, A, B, scale) -> (y, S)``: the layer, differentiable in x,
  A, B (and bias / W when they require grad). Up to DECODE_ROWS tokens the CUDA and Triton kernels
  do the layer in one launch; above, Triton computes S (``lora_shrink``) and then y in one GEMM
  whose epilogue adds ``scale * S B^T`` (``lora_matmul``). The CUDA backend has the decode kernel
  only: above DECODE_ROWS tokens it runs the reference (cuBLAS).
* Backward (W frozen): G = dY B (``lora_shrink`` of dY with B^T), dX = dY W + s G A (``lora_matmul``
  on W^T and A^T), dA = s G^T X and dB = s dY^T S (``lora_weight_grad``); G is shared by dX and dA,
  S comes from the forward pass.
* ``lora_shrink(x, a) -> x a^T``, ``lora_matmul(x, w, bias, s, b, scale)``,
  ``lora_weight_grad(u, v, scale) -> scale u^T v``: the pieces, float32 where they say so.

The reference (backend "torch") is plain PyTorch: cuBLAS in x's dtype for x W^T, float32 for the
rest. It is the test oracle and, until a kernel passes the GPU tests on a real card, the GPU default.
"""

from __future__ import annotations

import logging

import torch

from .. import _native, backends
from ..backends import register, resolve
from ._dispatch import op_boundary_needed

logger = logging.getLogger("lightllm")

LINEAR = "lora_linear"
SHRINK = "lora_shrink"
MATMUL = "lora_matmul"
WEIGHT_GRAD = "lora_weight_grad"

DECODE_ROWS = 16  # tokens up to which the layer is one launch (CUDA and Triton)

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- reference ------------------------------------------------------------------------------

def lora_shrink_reference(x, a):
    return x.float() @ a.float().t()


def lora_matmul_reference(x, w, bias, s, b, scale: float):
    """``x @ w^T + bias + scale * s @ b^T``: the plain layer in x's dtype (cuBLAS), then the rank-r
    term added in float32 and rounded to x's dtype again (PEFT's arithmetic: with B = 0, a fresh
    adapter, the result is the plain layer's bit for bit). The kernels round once."""
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if s is None:
        return y
    return torch.addmm(y.float(), s.float(), b.float().t(), alpha=scale).to(x.dtype)


def lora_weight_grad_reference(u, v, scale: float):
    return (u.float().t() @ v.float()) * scale


def lora_linear_reference(x, w, bias, a, b, scale: float):
    s = lora_shrink_reference(x, a)
    return lora_matmul_reference(x, w, bias, s, b, scale), s


register(SHRINK, "torch", ("cpu", "cuda"))(lora_shrink_reference)
register(MATMUL, "torch", ("cpu", "cuda"))(lora_matmul_reference)
register(WEIGHT_GRAD, "torch", ("cpu", "cuda"))(lora_weight_grad_reference)
register(LINEAR, "torch", ("cpu", "cuda"))(lora_linear_reference)


# ---- Triton ---------------------------------------------------------------------------------

@register(SHRINK, "triton", ("cuda", "cpu"))
def _lora_shrink_triton(x, a):
    from ..kernels import lora as k

    return k.lora_shrink(x, a)


@register(MATMUL, "triton", ("cuda", "cpu"))
def _lora_matmul_triton(x, w, bias, s, b, scale):
    from ..kernels import lora as k

    return k.lora_matmul(x, w, bias, s, b, scale)


@register(WEIGHT_GRAD, "triton", ("cuda", "cpu"))
def _lora_weight_grad_triton(u, v, scale):
    from ..kernels import lora as k

    return k.lora_weight_grad(u, v, scale)


@register(LINEAR, "triton", ("cuda", "cpu"))
def _lora_linear_triton(x, w, bias, a, b, scale):
    from ..kernels import lora as k

    if x.shape[0] <= DECODE_ROWS:
        return k.lora_decode(x, w, bias, a, b, scale)
    s = k.lora_shrink(x, a)
    return k.lora_matmul(x, w, bias, s, b, scale), s


# ---- CUDA -----------------------------------------------------------------------------------

_cuda_fallbacks_logged: set[str] = set()


def cuda_decode_fits(x: torch.Tensor, w: torch.Tensor, lora_rank: int = 0) -> str | None:
    """None when the CUDA decode kernel takes these operands, else why not."""
    if x.shape[0] > DECODE_ROWS:
        return f"more than {DECODE_ROWS} tokens"
    if lora_rank > 2048:
        return "rank above 2048 (the kernel keeps S for 16 rows in shared memory)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x is {x.dtype} (the kernel's tensor-core path takes float16 and bfloat16)"
    k = w.shape[1]
    if w.stride(1) != 1 or (w.shape[0] > 1 and w.stride(0) != k) or k % 8 or w.data_ptr() % 16:
        return "the weight is not a contiguous, 16-byte aligned [N, K] with K a multiple of 8"
    return None


@register(LINEAR, "cuda", ("cuda",))
def _lora_linear_cuda(x, w, bias, a, b, scale):
    why = cuda_decode_fits(x, w, a.shape[0])
    if why is None:
        return _native.cuda_module().lora_decode(x, w, bias, a, b, scale)
    if why not in _cuda_fallbacks_logged:
        _cuda_fallbacks_logged.add(why)
        logger.info("lora_linear (cuda): %s, so this call runs the reference (cuBLAS)", why)
    backends.note_handover(LINEAR, "cuda", "torch", why)
    return lora_linear_reference(x, w, bias, a, b, scale)


# ---- the custom ops -------------------------------------------------------------------------

@torch.library.custom_op("lightllm::lora_shrink", mutates_args=())
def lora_shrink_op(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    _, impl = resolve(SHRINK, x.device)
    return impl(x, a)


@lora_shrink_op.register_fake
def _(x, a):
    return x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lightllm::lora_matmul", mutates_args=())
def lora_matmul_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor | None,
                   b: torch.Tensor | None, scale: float) -> torch.Tensor:
    _, impl = resolve(MATMUL, x.device)
    return impl(x, w, bias, s, b, scale)


@lora_matmul_op.register_fake
def _(x, w, bias, s, b, scale):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("lightllm::lora_weight_grad", mutates_args=())
def lora_weight_grad_op(u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    _, impl = resolve(WEIGHT_GRAD, u.device)
    return impl(u, v, scale)


@lora_weight_grad_op.register_fake
def _(u, v, scale):
    return u.new_empty((u.shape[1], v.shape[1]), dtype=torch.float32)


@torch.library.custom_op("lightllm::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, impl = resolve(LINEAR, x.device)
    return impl(x, weight, bias, lora_a, lora_b, scale)


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)


def adapter_backward(grad_y, x, dense_weight, a, b, s, scale: float, need_x: bool, need_a: bool, need_b: bool):
    """(dX, dA, dB) of ``y = x W^T + scale * (x A^T) B^T`` for a frozen W; ``dense_weight()``
    gives W [N, K] in grad_y's dtype (a quantized base dequantizes it only when dX is needed)."""
    g = torch.ops.lightllm.lora_shrink(grad_y, b.t()) if (need_x or need_a) else None  # G = dY B
    dx = torch.ops.lightllm.lora_matmul(grad_y, dense_weight().t(), None, g, a.t(), scale) if need_x else None
    da = torch.ops.lightllm.lora_weight_grad(x, g, scale).t().to(a.dtype) if need_a else None
    db = torch.ops.lightllm.lora_weight_grad(grad_y, s, scale).to(b.dtype) if need_b else None
    return dx, da, db


def _linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.mark_non_differentiable(output[1])  # S is returned for the caller's information only
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad_y, _grad_s):
    x, weight, lora_a, lora_b, s = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
    dx, da, db = adapter_backward(grad_y, x, lambda: weight, lora_a, lora_b, s, ctx.scale, need_x, need_a, need_b)
    dw = (grad_y.t() @ x).to(weight.dtype) if need_w else None
    dbias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
    return dx, dw, dbias, da, db, None


lora_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---- checks and the eager fast path ---------------------------------------------------------

def check_adapter(op: str, x: torch.Tensor, n: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """lora_a [r, K] and lora_b [N, r], float, on x's device; a clear error otherwise."""
    k = x.shape[1]
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
        raise ValueError(f"{op}: lora_a must be [r, in_features] = [r, {k}] with r >= 1, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"{op}: lora_b must be [out_features, r] = [{n}, {r}], got {tuple(lora_b.shape)}")


def check_lora_linear(x, weight, bias, lora_a, lora_b) -> None:
    op = "lora_linear"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [tokens, in_features], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [out_features, in_features] with in_features = {x.shape[1]} "
                         f"(x's last dimension), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight is {weight.dtype} but x is {x.dtype}; they must match")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    n = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in _FLOAT_TYPES
                             or bias.device != x.device):
        raise ValueError(f"{op}: bias must be a float [{n}] tensor on {x.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")
    check_adapter(op, x, n, lora_a, lora_b)


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """y of ``torch.ops.lightllm.lora_linear`` after argument checks, minus the custom op's Python
    dispatch when nothing needs the op boundary (eager inference calls the backend directly)."""
    check_lora_linear(x, weight, bias, lora_a, lora_b)
    if op_boundary_needed(x, weight, bias, lora_a, lora_b):
        return torch.ops.lightllm.lora_linear(x, weight, bias, lora_a, lora_b, scale)[0]
    _, impl = resolve(LINEAR, x.device)
    return impl(x, weight, bias, lora_a, lora_b, scale)[0]
