"""bitsandbytes' 4-bit Linear layers (QLoRA's base): ``Linear4bit``, ``LinearNF4``, ``LinearFP4``.

Same constructor, defaults and state dict as bitsandbytes 0.50 (``weight`` holds the packed codes,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the packed
``weight.quant_state.bitsandbytes__nf4|fp4`` the quant state), so checkpoints move both ways.
As in bitsandbytes, a layer built with a dense weight quantizes it when it is moved to a device
(``.to(...)``, ``.cuda()``, ``.cpu()``) or, here, at its first forward; loading a dense state dict
quantizes too. The weight is frozen: gradients flow to the input (and a trainable bias).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..ops import fourbit as _fourbit_ops
from ..quantization.bnb import nf4

logger = logging.getLogger("lightllm")

_QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Params4bit(nn.Parameter):
    """The weight of a 4-bit layer: dense until quantized, then packed codes with ``quant_state``
    (the attribute bitsandbytes' and peft's code reads)."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False, quant_state=None,
                blocksize: int = 64, compress_statistics: bool = True, quant_type: str = "fp4",
                quant_storage: torch.dtype = torch.uint8):
        if data is None:
            data = torch.empty(0)
        self = super().__new__(cls, data, requires_grad)
        self.quant_state = quant_state
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        return self

    @property
    def bnb_quantized(self) -> bool:
        return self.quant_state is not None

    def __deepcopy__(self, memo):
        copy = type(self)(self.data.clone(), self.requires_grad, None, self.blocksize, self.compress_statistics,
                          self.quant_type, self.quant_storage)
        if self.quant_state is not None:
            copy.quant_state = nf4.QuantState.from_dict(self.quant_state.as_dict(packed=True),
                                                        self.quant_state.absmax.device)
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol):
        state = (self.quant_state.as_dict(packed=True) if self.quant_state is not None else None)
        return (_rebuild_params4bit, (self.data, self.requires_grad, state, self.blocksize, self.compress_statistics,
                                      self.quant_type, self.quant_storage))


def _rebuild_params4bit(data, requires_grad, state, blocksize, compress_statistics, quant_type, quant_storage):
    quant_state = nf4.QuantState.from_dict(state, data.device) if state is not None else None
    return Params4bit(data, requires_grad, quant_state, blocksize, compress_statistics, quant_type, quant_storage)


class Linear4bit(nn.Module):
    """``y = x W^T + b`` with W stored in 4 bits (NF4 or FP4, block-wise absmax, optionally double
    quantized). Arguments and defaults are bitsandbytes' (``quant_type="fp4"``,
    ``compress_statistics=True``, blocksize 64); ``compute_dtype`` is the dtype the matmul runs in
    (None: the input's)."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True, compute_dtype=None,
                 compress_statistics: bool = True, quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8,
                 device=None, blocksize: int = 64):
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        nf4._check_blocksize(blocksize)
        self.in_features, self.out_features = input_features, output_features
        dense = torch.empty(output_features, input_features, device=device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))  # nn.Linear's initialisation, until weights are loaded
        self.weight = Params4bit(dense, False, None, blocksize, compress_statistics, quant_type, quant_storage)
        if bias:
            bound = 1 / math.sqrt(input_features) if input_features else 0
            self.bias = nn.Parameter(torch.empty(output_features, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = compute_dtype
        self._warned_fp32_compute = False

    #: the code LinearNF4 / LinearFP4 are made for (their constructors take no quant_type)
    fixed_quant_type: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str | None = None, compress_statistics: bool = True,
                    compute_dtype=None, blocksize: int = 64, quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """Quantize a dense ``nn.Linear`` (its weight's dtype is recorded as the dequantized dtype).
        ``quant_type``: default nf4 (LinearNF4, LinearFP4: their own, and no other)."""
        if quant_type is None:
            quant_type = cls.fixed_quant_type or "nf4"
        elif cls.fixed_quant_type is not None and quant_type != cls.fixed_quant_type:
            raise ValueError(f"{cls.__name__}.from_linear: quant_type must be {cls.fixed_quant_type!r}, got {quant_type!r}")
        layer = cls.__new__(cls)  # Linear4bit's constructor: the subclasses' fix quant_type and drop it
        Linear4bit.__init__(layer, linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                            compress_statistics, quant_type, quant_storage, device="meta", blocksize=blocksize)
        weight = linear.weight.detach()
        layer.weight = Params4bit(weight.clone(), False, None, blocksize, compress_statistics, quant_type,
                                  quant_storage)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        layer.quantize_()
        return layer

    # ---- quantization state ----------------------------------------------------------------

    @property
    def quant_state(self) -> nf4.QuantState | None:
        return self.weight.quant_state

    @torch.no_grad()
    def quantize_(self) -> None:
        """Quantize the dense weight now (a no-op once quantized)."""
        w = self.weight
        if w.quant_state is not None:
            return
        if w.device.type == "meta":
            raise RuntimeError("Linear4bit: the weight is on the meta device; load weights before quantizing")
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: weight must be [{self.out_features}, {self.in_features}], got "
                             f"{tuple(w.shape)}")
        packed, state = nf4.quantize_4bit(w.data, blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                          quant_type=w.quant_type, quant_storage=w.quant_storage)
        self.weight = Params4bit(packed, False, state, w.blocksize, w.compress_statistics, w.quant_type,
                                 w.quant_storage)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the weight by the quantization of ``weight`` [out, in] (same type, blocksize, double
        quantization and dtype): what merging an adapter into a 4-bit layer takes. Lossy: the sum is
        rounded to the 4-bit grid again."""
        self.quantize_()
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit.requantize_: weight must be [{self.out_features}, {self.in_features}], "
                             f"got {tuple(weight.shape)}")
        w, state = self.weight, self.quant_state
        packed, new_state = nf4.quantize_4bit(weight.to(state.absmax.device, state.dtype), blocksize=w.blocksize,
                                              compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                              quant_storage=w.quant_storage)
        self.weight = Params4bit(packed, False, new_state, w.blocksize, w.compress_statistics, w.quant_type,
                                 w.quant_storage)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] (its original dtype unless ``dtype``)."""
        self.quantize_()
        w = nf4.dequantize_4bit(self.weight.data, self.quant_state)
        return w if dtype is None else w.to(dtype)

    def _apply(self, fn, *args, **kwargs):
        # bitsandbytes quantizes on the move to a device; packed uint8 codes are never cast (float
        # casts skip integer tensors), and the quant state follows the codes' device.
        result = super()._apply(fn, *args, **kwargs)
        if self.weight.quant_state is not None:
            self.weight.quant_state.to(self.weight.device)
        elif self.weight.device.type != "meta" and self.weight.numel():
            self.quantize_()
        return result

    # ---- state dict: bitsandbytes' keys ---------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.quantize_()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key = prefix + "weight"
        quant_keys = {k: state_dict[k] for k in list(state_dict)
                      if k.startswith(weight_key + ".") and (k.rsplit(".", 1)[-1] in _QUANT_SUFFIXES
                                                              or ".quant_state." in k)}
        weight = state_dict.get(weight_key)
        w = self.weight
        if weight is not None and quant_keys:
            state = nf4.QuantState.from_dict({k[len(weight_key) + 1:]: v for k, v in quant_keys.items()},
                                             w.device if w.device.type != "meta" else weight.device)
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{weight_key}: the 4-bit weight is {tuple(state.shape)}, the layer "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            if _as_bytes(weight).numel() != (math.prod(state.shape) + 1) // 2:
                error_msgs.append(f"{weight_key}: {_as_bytes(weight).numel()} bytes of codes for "
                                  f"{tuple(state.shape)}")
                return
            data = weight.detach().to(state.absmax.device)
            loaded = Params4bit(data.clone(), False, state, state.blocksize, state.nested, state.quant_type,
                                data.dtype)
        elif weight is not None:  # a dense checkpoint: quantized with this layer's settings
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{weight_key}: shape {tuple(weight.shape)}, the layer needs "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            device = w.device if w.device.type != "meta" else weight.device
            loaded = Params4bit(weight.detach().to(device).clone(), False, None, w.blocksize, w.compress_statistics,
                                w.quant_type, w.quant_storage)
        else:
            loaded = None
            missing_keys.append(weight_key)
        bias_key = prefix + "bias"
        if self.bias is not None:
            bias = state_dict.get(bias_key)
            if bias is None:
                missing_keys.append(bias_key)
            elif tuple(bias.shape) != (self.out_features,):
                error_msgs.append(f"{bias_key}: shape {tuple(bias.shape)}, the layer needs [{self.out_features}]")
                return
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)
        # everything checked: now change the layer
        if loaded is not None:
            self.weight = loaded
            if loaded.quant_state is None:
                self.quantize_()
        if self.bias is not None and state_dict.get(bias_key) is not None:
            with torch.no_grad():
                bias = state_dict[bias_key]
                if self.bias.device.type == "meta":
                    self.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
                else:
                    self.bias.copy_(bias)
        known = {weight_key, bias_key, *quant_keys}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                               and "." not in k[len(prefix):])

    # ---- forward ----------------------------------------------------------------------------------

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is None:
            return x.dtype
        # Not while torch.compile traces: a logger call there is a graph break (an eager call warns).
        if (x.dtype == torch.float16 and self.compute_dtype == torch.float32 and not self._warned_fp32_compute
                and not torch.compiler.is_compiling()):
            self._warned_fp32_compute = True
            logger.warning("Linear4bit: float16 input with compute_dtype float32: the matmul runs in float32 (slow); "
                           "set compute_dtype=torch.float16")
        return self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.quantize_()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        dtype = self._compute_dtype(x)
        state = self.quant_state
        # double quantization: the raw nested state goes to the op; its kernels decode the absmax codes
        y = _fourbit_ops.matmul_4bit(x.reshape(-1, self.in_features).to(dtype), _as_bytes(self.weight.data),
                                     state.absmax, state.blocksize, state.quant_type, self.out_features, self.bias,
                                     *_fourbit_ops.nested_args(state))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={w.quant_type}, blocksize={w.blocksize}, compress_statistics={w.compress_statistics}")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype == torch.uint8 else t.contiguous().view(torch.uint8)).reshape(-1)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with NF4 codes (what QLoRA uses)."""

    fixed_quant_type = "nf4"

    def __init__(self, input_features: int, output_features: int, bias: bool = True, compute_dtype=None,
                 compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8, device=None,
                 blocksize: int = 64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device, blocksize)


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with FP4 (e2m1) codes."""

    fixed_quant_type = "fp4"

    def __init__(self, input_features: int, output_features: int, bias: bool = True, compute_dtype=None,
                 compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8, device=None,
                 blocksize: int = 64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device, blocksize)
