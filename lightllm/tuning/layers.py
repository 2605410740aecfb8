"""The base-layer registry and the base class of every tuning method's layer.

A tuning method wraps a frozen layer (its "base layer") in a :class:`TunerLayer`. Which layers can
be wrapped, their sizes, how their weight can change (a merge) and which fused paths they offer
are facts of the base layer, not of the method, so they live here in one registry: a method asks
``base_layer_kind(module)`` and never names QuantLinear or Conv1D itself. A new base layer (the
8-bit and 4-bit layers) is one :func:`register_base_layer` call.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # where the global forward hooks live

from ..nn.linear4bit import Linear4bit, LinearFP4, LinearNF4
from ..nn.linear4bit import _as_bytes as _linear4bit_bytes
from ..nn.linear8bit import Linear8bitLt
from ..nn.quant_linear import QuantLinear


@dataclasses.dataclass(frozen=True)
class BaseLayerKind:
    """How tuning methods attach to one kind of frozen layer.

    Attributes:
        name: for messages ("nn.Linear", "QuantLinear", ...).
        matches: whether a module is of this kind.
        features: (in_features, out_features).
        reference: a tensor of the layer's device and dtype (new adapters are created on its device).
        dense_weight: the weight as an [out, in] view in the layer's dtype, or None for a quantized
            layer (the fused dense kernels take it; quantized layers offer their own paths).
        is_plain: whether a module is exactly the plain class, whose forward the fused ops may
            stand in for (a subclass may compute something else).
        quantized: the weight is stored packed; a merge must quantize again.
        logical_weight_numel: parameters a quantized layer holds packed, counted as in x out (+ bias)
            so that "all params" means the same with and without quantization.
        add_to_weight: ``fn(layer, delta [out, in] float32)`` adds delta to the weight (a
            quantized layer quantizes the sum again).
        lora_forward: ``fn(layer, x, a, b, scale, training) -> y`` for a base with its own fused
            LoRA path (the rank-r term in the quantized GEMM's epilogue: QuantLinear, Linear4bit,
            Linear8bitLt), else None; it may return None for a call the plain path must serve.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    reference: Callable[[nn.Module], torch.Tensor]
    dense_weight: Callable[[nn.Module], torch.Tensor | None]
    is_plain: Callable[[nn.Module], bool] = lambda m: False
    quantized: bool = False
    logical_weight_numel: Callable[[nn.Module], int] | None = None
    add_to_weight: Callable[[nn.Module, torch.Tensor], None] | None = None
    lora_forward: Callable | None = None


_KINDS: list[BaseLayerKind] = []


def register_base_layer(kind: BaseLayerKind) -> BaseLayerKind:
    """Make ``kind`` wrappable by every tuning method. Later registrations are asked first, so a
    subclass's kind can be registered after its parent's."""
    _KINDS.insert(0, kind)
    return kind


def base_layer_kind(module: nn.Module) -> BaseLayerKind | None:
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def supported_base_layers() -> str:
    return ", ".join(k.name for k in reversed(_KINDS))


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a registered base layer."""
    kind = base_layer_kind(module)
    if kind is None:
        raise TypeError(f"tuning methods wrap {supported_base_layers()}, not {type(module).__name__}")
    return kind.features(module)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a Linear whose weight is stored [in_features, out_features]."""
    return type(module).__name__ == "Conv1D"


def runs_as_plain_layer(module: nn.Module) -> bool:
    """Whether a fused op may stand in for ``module``'s forward: exactly its kind's plain class,
    with no forward replaced on the instance and no hooks to run."""
    kind = base_layer_kind(module)
    if kind is None or not kind.is_plain(module):
        return False
    if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
        return False
    return not (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


# ---- the built-in kinds ---------------------------------------------------------------------

def _add_to_dense(layer: nn.Module, delta: torch.Tensor) -> None:
    w = layer.weight
    w.add_(delta.t() if is_conv1d(layer) else delta)  # a float32 delta: one rounding to w's dtype


def _add_to_quantized(layer: QuantLinear, delta: torch.Tensor) -> None:
    layer.requantize_(layer.dequantize(torch.float32) + delta.to(layer.qweight.device))


def _quant_lora_forward(layer: QuantLinear, x, a, b, scale, training: bool):
    if training:
        return layer.lora_linear(x, a, b, scale)
    return layer.forward_with_lora(x, lora_a=a, lora_b=b, lora_scale=scale)


register_base_layer(BaseLayerKind(
    name="nn.Linear",
    matches=lambda m: isinstance(m, nn.Linear),
    features=lambda m: (m.in_features, m.out_features),
    reference=lambda m: m.weight,
    dense_weight=lambda m: m.weight,
    is_plain=lambda m: type(m) is nn.Linear,
    add_to_weight=_add_to_dense,
))
register_base_layer(BaseLayerKind(
    name="transformers' Conv1D",
    matches=is_conv1d,
    features=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    reference=lambda m: m.weight,
    dense_weight=lambda m: m.weight.t(),
    is_plain=is_conv1d,  # transformers' class, found by name
    add_to_weight=_add_to_dense,
))
register_base_layer(BaseLayerKind(
    name="QuantLinear",
    matches=lambda m: isinstance(m, QuantLinear),
    features=lambda m: (m.in_features, m.out_features),
    reference=lambda m: m.scales,
    dense_weight=lambda m: None,
    is_plain=lambda m: type(m) is QuantLinear,
    quantized=True,
    logical_weight_numel=lambda m: m.in_features * m.out_features + (m.out_features if m.bias is not None else 0),
    add_to_weight=_add_to_quantized,
    lora_forward=_quant_lora_forward,
))


def _linear4bit_lora_forward(layer: Linear4bit, x, a, b, scale, training: bool):
    # lightllm::fourbit_lora_linear: the packed weight read once with the rank-r term in the GEMV's
    # epilogue; differentiable in x, A, B (and a trainable bias) whether training or not
    from ..ops import fourbit as ops_fourbit

    layer.quantize_()
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"Linear4bit: input has {x.shape[-1]} features, the layer takes {layer.in_features}")
    state = layer.quant_state
    dtype = layer._compute_dtype(x)
    y = ops_fourbit.fourbit_lora_linear(x.to(dtype), _linear4bit_bytes(layer.weight.data), state.absmax,
                                        state.blocksize, state.quant_type, layer.out_features, layer.bias, a, b,
                                        scale, *ops_fourbit.nested_args(state))
    return y.to(x.dtype)


def _linear8bit_lora_forward(layer: Linear8bitLt, x, a, b, scale, training: bool):
    # lightllm::int8_lora_linear: the rank-r term in the int8 kernel's epilogue. A layer that keeps a
    # trainable dense weight (has_fp16_weights) runs the plain path: its weight needs its own gradient.
    from ..ops import int8 as ops_int8

    if layer.has_fp16_weights:
        return None
    layer.quantize_()
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"Linear8bitLt: input has {x.shape[-1]} features, the layer takes {layer.in_features}")
    return ops_int8.int8_lora_linear(x, layer.weight.data, layer.weight.SCB, layer.bias, layer.threshold, a, b, scale)


def _linear4bit_reference(layer: Linear4bit) -> torch.Tensor:
    layer.quantize_()  # the dtype it dequantizes to is known once quantized
    return torch.empty(0, device=layer.weight.device, dtype=layer.compute_dtype or layer.quant_state.dtype)


register_base_layer(BaseLayerKind(
    name="Linear4bit",
    matches=lambda m: isinstance(m, Linear4bit),
    features=lambda m: (m.in_features, m.out_features),
    reference=_linear4bit_reference,
    dense_weight=lambda m: None,
    is_plain=lambda m: type(m) in (Linear4bit, LinearNF4, LinearFP4),
    quantized=True,
    logical_weight_numel=lambda m: m.in_features * m.out_features + (m.out_features if m.bias is not None else 0),
    add_to_weight=lambda m, delta: m.requantize_(m.dequantize(torch.float32) + delta.to(m.weight.device)),
    lora_forward=_linear4bit_lora_forward,
))

register_base_layer(BaseLayerKind(
    name="Linear8bitLt",
    matches=lambda m: isinstance(m, Linear8bitLt),
    features=lambda m: (m.in_features, m.out_features),
    reference=lambda m: m.bias if m.bias is not None else torch.empty(0, device=m.weight.device),
    dense_weight=lambda m: None,
    is_plain=lambda m: type(m) is Linear8bitLt,
    quantized=True,
    logical_weight_numel=lambda m: m.in_features * m.out_features + (m.out_features if m.bias is not None else 0),
    add_to_weight=lambda m, delta: m.requantize_(m.dequantize(torch.float32) + delta.to(m.weight.device)),
    lora_forward=_linear8bit_lora_forward,
))


# ---- the layer base ---------------------------------------------------------------------------

class TunerLayer(nn.Module):
    """A frozen base layer plus named adapters of one tuning method.

    Subclasses list in ``adapter_module_names`` the ModuleDict / ParameterDict attributes keyed by
    adapter name; deleting an adapter, marking what trains and counting parameters go through them.
    """

    adapter_module_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = base_layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"{type(self).__name__} wraps {supported_base_layers()}, not {type(base_layer).__name__}")
        self.in_features, self.out_features = kind.features(base_layer)
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def base_kind(self) -> BaseLayerKind:
        # Looked up, not stored: the kinds hold functions, and a stored one would make the model
        # unpicklable (torch.save of a whole wrapped model).
        return base_layer_kind(self.base_layer)

    def _base_reference(self) -> torch.Tensor:
        return self.base_kind.reference(self.base_layer)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_module_names:
            names += [n for n in getattr(self, attr).keys() if n not in names]
        return names

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_module_names:
            holder = getattr(self, attr)
            if name not in holder:
                continue
            item = holder[name]
            params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return params

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        for attr in self.adapter_module_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def merge(self, names: list[str], requantize: bool = False) -> None:
        raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def unmerge(self) -> None:
        if self.merged_adapters:
            raise RuntimeError(f"{type(self).__name__}: merged adapters {self.merged_adapters} cannot be unmerged")
