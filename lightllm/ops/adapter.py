"""Ops of a bottleneck adapter: ``y = res + s * (act(z Wd^T + bd) Wu^T + bu)``.

Shapes: z [M, K] (the adapter's input), res [M, N] (what its output is added to; z itself for an
adapter with its own skip connection), Wd [b, K], bd [b], Wu [N, b], bu [N], s a float32 tensor of
one element (a learned scaling is a parameter; a fixed one a constant tensor, so that the kernels
read it on the device). z and res share a float dtype; the adapter's tensors may be any float
dtype. The adapter is computed in float32 (as LLM-Adapters does) and y rounded once to res's dtype.

* ``lightllm::bottleneck_adapter(z, res, Wd, bd, Wu, bu, s, act) -> (y, a)``: a = z Wd^T + bd in
  float32 is returned for the backward pass (h = act(a) is recomputed there, not stored).
  Differentiable in every tensor. Triton: one launch up to DECODE_ROWS tokens, else the split-K
  skinny kernel for a and one GEMM with the activation in its prologue and the bias, scaling
  and residual in its epilogue (kernels/adapter.py).
* ``lightllm::bottleneck_adapter_backward(dY, z, a, Wd, Wu, bu, s, act, needs) -> (dz, dWd, dbd,
  dWu, dbu, ds)``: g = dY Wu, da = s g act'(a), dz = da Wd, dWd = da^T z, dbd = sum da,
  dWu = s dY^T act(a), dbu = s sum dY, ds = <act(a), g> + <bu, sum dY>; gradients not asked for come
  back empty. (dres = dY is autograd's, outside the op.)

The reference (backend "torch") is plain PyTorch in float32; it is the test oracle and, until a
kernel passes the GPU tests on a real card, the GPU default. There is no CUDA kernel: the Triton
one is the GPU path (a CUDA version would pay only at decode, where both are bound by reading
the adapter's weights).
"""

from __future__ import annotations

import math

import torch

from ..backends import register, resolve
from ._dispatch import op_boundary_needed

ADAPTER = "bottleneck_adapter"
ADAPTER_BACKWARD = "bottleneck_adapter_backward"

DECODE_ROWS = 16
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the op takes (float64 runs module by module)

# The activations the op takes, by transformers' ACT2FN names (kernels/adapter.py has the same table).
ACTIVATIONS = ("linear", "identity", "relu", "tanh", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu",
               "swish", "sigmoid", "leakyrelu", "leaky_relu")


def activation_reference(a: torch.Tensor, act: str) -> torch.Tensor:
    if act in ("linear", "identity"):
        return a
    if act == "relu":
        return torch.relu(a)
    if act == "tanh":
        return torch.tanh(a)
    if act == "gelu":
        return torch.nn.functional.gelu(a)
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return torch.nn.functional.gelu(a, approximate="tanh")
    if act in ("silu", "swish"):
        return torch.nn.functional.silu(a)
    if act == "sigmoid":
        return torch.sigmoid(a)
    if act in ("leakyrelu", "leaky_relu"):
        return torch.nn.functional.leaky_relu(a, 0.01)
    raise ValueError(f"bottleneck_adapter: activation {act!r} is not one of {', '.join(ACTIVATIONS)}")


def activation_grad_reference(a: torch.Tensor, act: str) -> torch.Tensor:
    """d act(a) / d a, by the formulas (the kernels use the same ones)."""
    if act in ("linear", "identity"):
        return torch.ones_like(a)
    if act == "relu":
        return (a > 0).to(a.dtype)
    if act == "tanh":
        return 1 - torch.tanh(a) ** 2
    if act == "gelu":
        return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (a + 0.044715 * a ** 3))
        return 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * c * (1 + 3 * 0.044715 * a * a)
    if act in ("silu", "swish"):
        sig = torch.sigmoid(a)
        return sig * (1 + a * (1 - sig))
    if act == "sigmoid":
        sig = torch.sigmoid(a)
        return sig * (1 - sig)
    if act in ("leakyrelu", "leaky_relu"):
        return torch.where(a > 0, 1.0, 0.01).to(a.dtype)
    raise ValueError(f"bottleneck_adapter: activation {act!r} is not one of {', '.join(ACTIVATIONS)}")


# ---- reference ------------------------------------------------------------------------------

def adapter_reference(z, res, wd, bd, wu, bu, scale, act: str):
    a = z.float() @ wd.float().t()
    if bd is not None:
        a = a + bd.float()
    u = activation_reference(a, act) @ wu.float().t()
    if bu is not None:
        u = u + bu.float()
    return (res.float() + scale.float() * u).to(res.dtype), a


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def adapter_backward_reference(dy, z, a, wd, wu, bu, scale, act: str, needs: list[bool]):
    need_z, need_wd, need_bd, need_wu, need_bu, need_s = needs
    dyf = dy.float()
    s = scale.float().reshape(())
    g = dyf @ wu.float()
    da = s * g * activation_grad_reference(a, act)
    h = activation_reference(a, act)
    col = dyf.sum(0)
    dz = (da @ wd.float()).to(z.dtype) if need_z else _empty(z)
    dwd = (da.t() @ z.float()).to(wd.dtype) if need_wd else _empty(wd)
    dbd = da.sum(0) if need_bd else _empty(a)
    dwu = (s * (dyf.t() @ h)).to(wu.dtype) if need_wu else _empty(wu)
    dbu = s * col if need_bu else _empty(a)
    ds = ((h * g).sum() + (bu.float() * col).sum() if bu is not None else (h * g).sum()).reshape(1) if need_s else _empty(a)
    return dz, dwd, dbd, dwu, dbu, ds


register(ADAPTER, "torch", ("cpu", "cuda"))(adapter_reference)
register(ADAPTER_BACKWARD, "torch", ("cpu", "cuda"))(adapter_backward_reference)


# ---- Triton ---------------------------------------------------------------------------------

@register(ADAPTER, "triton", ("cuda", "cpu"))
def _adapter_triton(z, res, wd, bd, wu, bu, scale, act):
    from ..kernels import adapter as k
    from ..kernels import lora as kl

    code = k.ACTIVATIONS[act]
    if z.shape[0] <= DECODE_ROWS:
        return k.adapter_decode(z, res, wd, bd, wu, bu, scale, code)
    a = kl.skinny_matmul(z, wd)
    if bd is not None:
        a += bd.float()
    return k.adapter_up(a, wu, bu, res, scale, code, res.dtype), a


@register(ADAPTER_BACKWARD, "triton", ("cuda", "cpu"))
def _adapter_backward_triton(dy, z, a, wd, wu, bu, scale, act, needs):
    from ..kernels import adapter as k
    from ..kernels import lora as kl

    need_z, need_wd, need_bd, need_wu, need_bu, need_s = needs
    code = k.ACTIVATIONS[act]
    g = kl.skinny_matmul(dy, wu.t())  # dY Wu [M, b]
    da, h = k.adapter_backward_act(g, a, scale, code)
    dz = k.adapter_up(da, wd.t(), None, None, None, 0, z.dtype) if need_z else _empty(z)
    # contiguous, as the fake implementation says (a compiled graph relies on the strides it declares)
    dwd = kl.lora_weight_grad(z, da, 1.0).t().to(wd.dtype).contiguous() if need_wd \
        else _empty(wd)
    dbd = da.sum(0) if need_bd else _empty(a)
    dwu = (kl.lora_weight_grad(dy, h, 1.0) * scale.float()).to(wu.dtype) if need_wu else _empty(wu)
    col = dy.float().sum(0) if (need_bu or need_s) else None
    dbu = col * scale.float() if need_bu else _empty(a)
    if need_s:
        ds = (h * g).sum()
        if bu is not None:
            ds = ds + (bu.float() * col).sum()
        ds = ds.reshape(1)
    else:
        ds = _empty(a)
    return dz, dwd, dbd, dwu, dbu, ds


# ---- the custom ops -------------------------------------------------------------------------

@torch.library.custom_op("lightllm::bottleneck_adapter", mutates_args=())
def bottleneck_adapter_op(z: torch.Tensor, res: torch.Tensor, down_weight: torch.Tensor,
                          down_bias: torch.Tensor | None, up_weight: torch.Tensor, up_bias: torch.Tensor | None,
                          scale: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, impl = resolve(ADAPTER, z.device)
    return impl(z, res, down_weight, down_bias, up_weight, up_bias, scale, act)


@bottleneck_adapter_op.register_fake
def _(z, res, down_weight, down_bias, up_weight, up_bias, scale, act):
    return res.new_empty(res.shape), z.new_empty((z.shape[0], down_weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lightllm::bottleneck_adapter_backward", mutates_args=())
def bottleneck_adapter_backward_op(grad_y: torch.Tensor, z: torch.Tensor, a: torch.Tensor, down_weight: torch.Tensor,
                                   up_weight: torch.Tensor, up_bias: torch.Tensor | None, scale: torch.Tensor,
                                   act: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor, torch.Tensor]:
    _, impl = resolve(ADAPTER_BACKWARD, z.device)
    return impl(grad_y, z, a, down_weight, up_weight, up_bias, scale, act, needs)


@bottleneck_adapter_backward_op.register_fake
def _(grad_y, z, a, down_weight, up_weight, up_bias, scale, act, needs):
    need_z, need_wd, need_bd, need_wu, need_bu, need_s = needs
    return (z.new_empty(z.shape if need_z else (0,)),
            down_weight.new_empty(down_weight.shape if need_wd else (0,)),
            a.new_empty((down_weight.shape[0],) if need_bd else (0,)),
            up_weight.new_empty(up_weight.shape if need_wu else (0,)),
            a.new_empty((up_weight.shape[0],) if need_bu else (0,)),
            a.new_empty((1,) if need_s else (0,)))


def _setup(ctx, inputs, output):
    z, res, down_weight, down_bias, up_weight, up_bias, scale, act = inputs
    ctx.mark_non_differentiable(output[1])  # a is returned for the backward pass only
    ctx.save_for_backward(z, output[1], down_weight, up_weight, up_bias, scale)
    ctx.act = act
    ctx.dtypes = (None if down_bias is None else down_bias.dtype, None if up_bias is None else up_bias.dtype,
                  scale.dtype, tuple(scale.shape))


def _backward(ctx, grad_y, _grad_a):
    z, a, down_weight, up_weight, up_bias, scale = ctx.saved_tensors
    need_z, need_res, need_wd, need_bd, need_wu, need_bu, need_s, _ = ctx.needs_input_grad
    needs = [need_z, need_wd, need_bd, need_wu, need_bu, need_s]
    dz, dwd, dbd, dwu, dbu, ds = torch.ops.lightllm.bottleneck_adapter_backward(
        grad_y.contiguous(), z, a, down_weight, up_weight, up_bias, scale, ctx.act, needs)
    bd_dtype, bu_dtype, s_dtype, s_shape = ctx.dtypes
    return (dz if need_z else None, grad_y if need_res else None, dwd if need_wd else None,
            dbd.to(bd_dtype) if need_bd else None, dwu if need_wu else None, dbu.to(bu_dtype) if need_bu else None,
            ds.to(s_dtype).reshape(s_shape) if need_s else None, None)


bottleneck_adapter_op.register_autograd(_backward, setup_context=_setup)


# ---- checks and the eager fast path ---------------------------------------------------------

def check_bottleneck_adapter(z, res, down_weight, down_bias, up_weight, up_bias, scale, act) -> None:
    op = "bottleneck_adapter"
    if z.dim() != 2 or res.dim() != 2 or z.shape[0] != res.shape[0]:
        raise ValueError(f"{op}: z must be [tokens, K] and res [tokens, N] with the same tokens, got "
                         f"{tuple(z.shape)} and {tuple(res.shape)}")
    if z.dtype not in FLOAT_TYPES or res.dtype != z.dtype:
        raise TypeError(f"{op}: z and res must share a float dtype (float32, float16, bfloat16), got {z.dtype} and "
                        f"{res.dtype}")
    k, n = z.shape[1], res.shape[1]
    if down_weight.dim() != 2 or down_weight.shape[1] != k or down_weight.shape[0] < 1:
        raise ValueError(f"{op}: down_weight must be [bottleneck, K] = [b, {k}] with b >= 1, got "
                         f"{tuple(down_weight.shape)}")
    b = down_weight.shape[0]
    if tuple(up_weight.shape) != (n, b):
        raise ValueError(f"{op}: up_weight must be [N, bottleneck] = [{n}, {b}], got {tuple(up_weight.shape)}")
    for name, t, size in (("down_bias", down_bias, b), ("up_bias", up_bias, n)):
        if t is not None and (t.dim() != 1 or t.shape[0] != size):
            raise ValueError(f"{op}: {name} must be [{size}], got {tuple(t.shape)}")
    if scale.numel() != 1 or scale.dtype not in FLOAT_TYPES:
        raise ValueError(f"{op}: scale must be a float tensor of one element, got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("res", res), ("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                    ("up_bias", up_bias), ("scale", scale)):
        if t is None:
            continue
        if t.dtype not in FLOAT_TYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"{op}: {name} is on {t.device} but z is on {z.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: activation {act!r} is not one of {', '.join(ACTIVATIONS)}")


def bottleneck_adapter(z, res, down_weight, down_bias, up_weight, up_bias, scale, act: str) -> torch.Tensor:
    """y of ``torch.ops.lightllm.bottleneck_adapter`` after argument checks (z, res: [tokens, ...]),
    minus the custom op's Python dispatch when nothing needs the op boundary."""
    check_bottleneck_adapter(z, res, down_weight, down_bias, up_weight, up_bias, scale, act)
    if op_boundary_needed(z, res, down_weight, down_bias, up_weight, up_bias, scale):
        return torch.ops.lightllm.bottleneck_adapter(z, res, down_weight, down_bias, up_weight, up_bias, scale, act)[0]
    _, impl = resolve(ADAPTER, z.device)
    return impl(z, res, down_weight, down_bias, up_weight, up_bias, scale, act)[0]
