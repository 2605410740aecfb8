"""bitsandbytes' LLM.int8() layer: ``Linear8bitLt`` with ``Int8Params``.

Same constructor, defaults (``has_fp16_weights=True``, ``threshold=0.0``; transformers uses 6.0) and
state dict as bitsandbytes 0.50: ``weight`` (int8 [out, in]), ``SCB`` (float32 [out]) and
``weight_format`` (uint8 0, "row") when the weight is frozen in int8. With
``has_fp16_weights=False`` the dense weight is quantized (from its float16 values) when the layer is
moved to a device, at its first forward, or when a dense state dict is loaded; unlike
bitsandbytes, an int8 checkpoint also loads into a layer that has not been moved yet.
With ``has_fp16_weights=True`` the weight stays dense and trainable and is quantized at every
forward (its gradient is the dense ``grad^T x``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import int8 as _ops
from ..quantization.bnb import int8 as _int8


class Int8Params(nn.Parameter):
    """The weight of a Linear8bitLt: dense, or int8 codes with their per-row absmax ``SCB``."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True, has_fp16_weights: bool = False,
                CB: torch.Tensor | None = None, SCB: torch.Tensor | None = None):  # noqa: N803 (bitsandbytes' names)
        if data is None:
            data = torch.empty(0)
        self = super().__new__(cls, data, requires_grad)
        self.has_fp16_weights = has_fp16_weights
        self.CB, self.SCB = CB, SCB
        return self

    def __deepcopy__(self, memo):
        copy = type(self)(self.data.clone(), self.requires_grad, self.has_fp16_weights)
        copy.SCB = None if self.SCB is None else self.SCB.clone()
        copy.CB = copy.data if self.CB is not None else None
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol):
        return (_rebuild_int8params, (self.data, self.requires_grad, self.has_fp16_weights, self.SCB))


def _rebuild_int8params(data, requires_grad, has_fp16_weights, scb):
    return Int8Params(data, requires_grad, has_fp16_weights, data if scb is not None else None, scb)


class _QuantizedEveryForward(torch.autograd.Function):
    """A trainable dense weight through the int8 forward: dX via the int8 weight, dW dense."""

    @staticmethod
    def forward(ctx, x, weight, bias, threshold):
        cb, scb, _ = _int8.int8_vectorwise_quant(weight.detach().to(torch.float16))
        ctx.save_for_backward(x, cb, scb)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.weight_dtype = weight.dtype
        with torch.no_grad():
            return torch.ops.lightllm.int8_linear(x, cb, scb, bias, threshold)

    @staticmethod
    def backward(ctx, grad_y):
        x, cb, scb = ctx.saved_tensors
        grad_x = grad_w = grad_bias = None
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (g.to(x.dtype) @ _ops.dequantized_weight(cb, scb, x.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t().to(x.dtype) @ x.reshape(-1, x.shape[-1])).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0, dtype=ctx.bias_dtype)
        return grad_x, grad_w, grad_bias, None


class Linear8bitLt(nn.Module):
    """``y = x W^T + b`` with LLM.int8(): int8 activations (per row) times the int8 weight (per output
    row), exact int32 accumulation; with ``threshold > 0`` the activation columns holding an
    outlier (|x| >= threshold) are multiplied in 16 bits instead."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 threshold: float = 0.0, index=None, device=None):
        super().__init__()
        if threshold < 0 or not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
        self.in_features, self.out_features = input_features, output_features
        self.threshold = float(threshold)
        self.index = index
        dense = torch.empty(output_features, input_features, device=device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self.weight = Int8Params(dense, has_fp16_weights, has_fp16_weights)
        if bias:
            bound = 1 / math.sqrt(input_features) if input_features else 0
            self.bias = nn.Parameter(torch.empty(output_features, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = 0.0, has_fp16_weights: bool = False) -> "Linear8bitLt":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights, threshold,
                    device="meta")
        layer.weight = Int8Params(linear.weight.detach().clone(), has_fp16_weights, has_fp16_weights)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        if not has_fp16_weights:
            layer.quantize_()
        return layer

    @property
    def has_fp16_weights(self) -> bool:
        return self.weight.has_fp16_weights

    @property
    def quantized(self) -> bool:
        return self.weight.dtype == torch.int8

    @torch.no_grad()
    def quantize_(self) -> None:
        """Freeze the dense weight into int8 codes and SCB now (no-op when already int8 or trainable)."""
        w = self.weight
        if self.quantized or w.has_fp16_weights:
            return
        if w.device.type == "meta":
            raise RuntimeError("Linear8bitLt: the weight is on the meta device; load weights before quantizing")
        cb, scb, _ = _int8.int8_vectorwise_quant(w.data.contiguous().to(torch.float16))
        self.weight = Int8Params(cb, False, False, cb, scb)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the int8 weight by the quantization of ``weight`` [out, in] (merging an adapter)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear8bitLt.requantize_: weight must be [{self.out_features}, {self.in_features}], "
                             f"got {tuple(weight.shape)}")
        if self.has_fp16_weights:
            self.weight.data.copy_(weight)
            return
        cb, scb, _ = _int8.int8_vectorwise_quant(weight.to(self.weight.device, torch.float16))
        self.weight = Int8Params(cb, False, False, cb, scb)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the layer uses it, [out, in]."""
        if not self.quantized:
            return self.weight.detach().to(dtype)
        return (_int8.int8_vectorwise_dequant(self.weight.data, self.weight.SCB)).to(dtype)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        w = self.weight
        if self.quantized and w.SCB is not None:
            w.SCB = w.SCB.to(w.device)
            w.CB = w.data
        elif not w.has_fp16_weights and w.device.type != "meta" and w.numel():
            self.quantize_()
        return result

    # ---- state dict ---------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.quantize_()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quantized:
            destination[prefix + "SCB"] = self.weight.SCB if keep_vars else self.weight.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key, scb_key, format_key, bias_key = (prefix + k for k in ("weight", "SCB", "weight_format", "bias"))
        weight, scb, fmt = state_dict.get(weight_key), state_dict.get(scb_key), state_dict.get(format_key)
        shape = (self.out_features, self.in_features)
        if fmt is not None and (int(fmt) if isinstance(fmt, (int, torch.Tensor)) else fmt) not in (0, "row"):
            error_msgs.append(f"{format_key}: only the row-major int8 format (0, 'row') is supported, got {fmt}")
            return
        if weight is None:
            missing_keys.append(weight_key)
        elif tuple(weight.shape) != shape:
            error_msgs.append(f"{weight_key}: shape {tuple(weight.shape)}, the layer needs {list(shape)}")
            return
        elif weight.dtype == torch.int8 and (scb is None or tuple(scb.shape) != (self.out_features,)):
            error_msgs.append(f"{scb_key}: an int8 weight needs its float32 per-row absmax SCB "
                              f"[{self.out_features}], got {None if scb is None else tuple(scb.shape)}")
            return
        elif weight.dtype == torch.int8 and self.has_fp16_weights:
            error_msgs.append(f"{weight_key}: an int8 checkpoint cannot load into a layer with has_fp16_weights=True")
            return
        bias = state_dict.get(bias_key)
        if self.bias is not None and bias is not None and tuple(bias.shape) != (self.out_features,):
            error_msgs.append(f"{bias_key}: shape {tuple(bias.shape)}, the layer needs [{self.out_features}]")
            return
        # checked: now change the layer
        device = self.weight.device if self.weight.device.type != "meta" else None
        if weight is not None:
            data = weight.detach().to(device or weight.device).clone()
            if data.dtype == torch.int8:
                self.weight = Int8Params(data, False, False, data, scb.detach().float().to(data.device).clone())
            else:
                self.weight = Int8Params(data.to(self.weight.dtype if self.weight.dtype != torch.int8 else data.dtype),
                                         self.has_fp16_weights, self.has_fp16_weights)
                self.quantize_()
        if self.bias is not None:
            if bias is None:
                missing_keys.append(bias_key)
            else:
                self.bias = nn.Parameter(bias.detach().to(device or bias.device).clone(),
                                         requires_grad=self.bias.requires_grad)
        elif bias is not None:
            unexpected_keys.append(bias_key)
        known = {weight_key, scb_key, format_key, bias_key}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                               and "." not in k[len(prefix):])

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear8bitLt: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        if self.has_fp16_weights:
            return _QuantizedEveryForward.apply(x, self.weight, self.bias, self.threshold)
        self.quantize_()
        return _ops.int8_linear(x, self.weight.data, self.weight.SCB, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"has_fp16_weights={self.has_fp16_weights}, threshold={self.threshold}")
