"""AdapterLayer: a frozen base layer (any registered kind) plus named bottleneck adapters.

Each adapter is ``s * up(act(down(z)))`` with its skip connection, placed as its config says
(config.py: mh, output, parallel, output_residual, parallel_residual). Module layout:
``base_layer``, ``adapter_down.<name>`` and ``adapter_up.<name>`` (nn.Linear, float32, biases
only when asked), ``adapter_scaling.<name>`` for a learned scaling, ``adapter_dropout.<name>``.

The adapter runs as one op (lightllm/ops/adapter.py): the input is read in its own dtype, all the
adapter's arithmetic is float32 (as LLM-Adapters computes it) and the output is rounded once to
the layer's dtype. Triton does it in one launch at decode sizes. The plain PyTorch path (the same
arithmetic, module by module) serves dropout while training, autocast, and activations the op
does not know. Unlike LLM-Adapters' 8-bit layer, the base layer runs once per call.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...ops import adapter as ops_adapter
from ..layers import TunerLayer


@dataclasses.dataclass
class AdapterSettings:
    placement: str
    non_linearity: str
    scaling: float | str  # a number or "learned" (then adapter_scaling.<name> holds it)
    dropout_on_output: bool = False


def _activation(name: str):
    from ..._extras import require

    ACT2FN = require("transformers.activations", "bottleneck adapters (their activations)").ACT2FN
    if name.lower() == "leakyrelu":  # AdapterHub's name; transformers has no entry for it
        return lambda t: nn.functional.leaky_relu(t, 0.01)
    return ACT2FN[name.lower()]


def adapter_widths(in_features: int, out_features: int, placement: str) -> tuple[int, int]:
    """(adapter input width, adapter output width) of a placement on a layer in -> out."""
    if placement == "mh":
        return in_features, in_features
    if placement == "parallel":
        return in_features, out_features
    return out_features, out_features  # reads o, o + r or r: the output's width


class _ResidualTap:
    """Forward pre-hook on the norm in front of a sublayer: its input is the residual stream r that
    the sublayer's output is added to. A callable object, not a closure, so that a deep copy of the
    model gets a tap on its own copy of the layer."""

    def __init__(self, layer: "AdapterLayer"):
        self.layer = layer

    def __call__(self, module, args, kwargs):
        self.layer._residual = args[0] if args else next(iter(kwargs.values()))


class AdapterLayer(TunerLayer):
    """A base layer plus named bottleneck adapters."""

    adapter_module_names = ("adapter_down", "adapter_up", "adapter_scaling")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_scaling = nn.ParameterDict()
        self.adapter_dropout = nn.ModuleDict()
        self.settings: dict[str, AdapterSettings] = {}
        self._residual: torch.Tensor | None = None
        self._residual_hooks: list = []
        self._scale_tensors: dict[tuple, torch.Tensor] = {}

    # ---- adapters ---------------------------------------------------------------------------------
    def widths(self, placement: str) -> tuple[int, int]:
        """(adapter input width, adapter output width) for a placement on this layer."""
        return adapter_widths(self.in_features, self.out_features, placement)

    def add_adapter(self, name: str, placement: str, bottleneck: int, non_linearity: str = "tanh",
                    scaling: float | str = 1.0, dropout: float = 0.0, dropout_on_output: bool = False,
                    bias: bool = False, init_weights: str = "bert") -> None:
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be an integer >= 1, got {bottleneck!r}")
        width_in, width_out = self.widths(placement)
        device = self._base_reference().device
        down = nn.Linear(width_in, bottleneck, bias=bias, device=device, dtype=torch.float32)
        up = nn.Linear(bottleneck, width_out, bias=bias, device=device, dtype=torch.float32)
        with torch.no_grad():
            if init_weights == "bert":
                nn.init.normal_(down.weight, std=0.02)
                nn.init.normal_(up.weight, std=0.02)
            elif init_weights == "mam_adapter":  # a new adapter changes nothing
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(up.weight)
            elif init_weights == "houlsby":
                nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
            else:
                raise ValueError(f"adapter init_weights must be 'bert', 'mam_adapter' or 'houlsby', got {init_weights!r}")
            for linear in (down, up):
                if linear.bias is not None:
                    linear.bias.zero_()
        self._scale_tensors = {k: v for k, v in self._scale_tensors.items() if k[0] != name}
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        if scaling == "learned":
            self.adapter_scaling[name] = nn.Parameter(torch.ones(1, device=device))
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _activation(non_linearity)  # an unknown name fails here, not at the first forward
        self.settings[name] = AdapterSettings(placement, non_linearity, scaling, dropout_on_output)
        if name not in self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.adapter_dropout:
            del self.adapter_dropout[name]
        self.settings.pop(name, None)
        self._scale_tensors = {k: v for k, v in self._scale_tensors.items() if k[0] != name}

    def attach_residual_source(self, norm: nn.Module) -> None:
        """Read the residual stream from ``norm``'s input (once per layer)."""
        if not self._residual_hooks:
            self._residual_hooks.append(norm.register_forward_pre_hook(_ResidualTap(self), with_kwargs=True))

    def detach_residual_source(self) -> None:
        for handle in self._residual_hooks:
            handle.remove()
        self._residual_hooks.clear()
        self._residual = None

    def merge(self, names: list[str], requantize: bool = False) -> None:
        raise ValueError("bottleneck adapters apply a nonlinearity between their two projections, so no change of the "
                         "base weights reproduces them: they cannot be merged (keep the wrapped model, or unload() "
                         "them)")

    # ---- forward ----------------------------------------------------------------------------------
    def _scale(self, name: str, device: torch.device) -> torch.Tensor:
        settings = self.settings[name]
        if settings.scaling == "learned":
            return self.adapter_scaling[name]
        key = (name, device, settings.scaling)  # the value in the key: a re-added adapter gets its own
        t = self._scale_tensors.get(key)
        if t is None:  # a constant on the device: the kernels read it there, no host value per call
            t = self._scale_tensors[key] = torch.tensor([settings.scaling], dtype=torch.float32, device=device)
        return t

    def _take_residual(self, name: str) -> torch.Tensor:
        r = self._residual
        self._residual = None  # one sublayer call per capture; do not keep the activation alive
        if r is None:
            raise RuntimeError(f"adapter {name!r} ({self.settings[name].placement}) reads the residual stream, but the "
                               "norm in front of this sublayer did not run before it (was the layer called on its own?)")
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        adapters = [] if self.disabled else self.active_adapters
        r = None
        if any(self.settings[n].placement in ("output_residual", "parallel_residual") for n in adapters):
            r = self._take_residual(adapters[0])
        else:
            self._residual = None
        for name in adapters:
            if self.settings[name].placement == "mh":
                x = self._adapt(name, x, x)
        y = base(x)
        for name in adapters:
            placement = self.settings[name].placement
            if placement == "output":
                y = self._adapt(name, y, y)
            elif placement == "parallel":
                y = self._adapt(name, x, y)
            elif placement == "output_residual":
                y = self._adapt(name, y + r.to(y.dtype), y)
            elif placement == "parallel_residual":
                y = self._adapt(name, r.to(y.dtype), y)
        return y

    def _adapt(self, name: str, z: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """``res + s * up(act(down(z)))`` for adapter ``name`` (z, res: [..., width])."""
        settings = self.settings[name]
        down, up = self.adapter_down[name], self.adapter_up[name]
        dropout = self.adapter_dropout[name]
        scale = self._scale(name, z.device)
        plain = (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0) \
            or torch.is_autocast_enabled(z.device.type) or settings.non_linearity.lower() not in ops_adapter.ACTIVATIONS \
            or z.dtype not in ops_adapter.FLOAT_TYPES or res.dtype != z.dtype
        if plain:
            return self._plain_adapt(name, z, res, scale)
        y = ops_adapter.bottleneck_adapter(z.reshape(-1, z.shape[-1]), res.reshape(-1, res.shape[-1]), down.weight,
                                           down.bias, up.weight, up.bias, scale, settings.non_linearity.lower())
        return y.reshape(res.shape)

    def _plain_adapt(self, name: str, z: torch.Tensor, res: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The same arithmetic module by module (dropout, autocast, other activations)."""
        settings = self.settings[name]
        down, up = self.adapter_down[name], self.adapter_up[name]
        dropout = self.adapter_dropout[name]
        zf = z.to(down.weight.dtype)
        if not settings.dropout_on_output:
            zf = dropout(zf)
        u = up(_activation(settings.non_linearity)(down(zf))) * scale
        if settings.dropout_on_output:
            u = dropout(u)
        return (res.to(u.dtype) + u).to(res.dtype)

    def extra_repr(self) -> str:
        placements = {n: s.placement for n, s in self.settings.items()}
        return f"adapters={placements}, active={self.active_adapters}"
