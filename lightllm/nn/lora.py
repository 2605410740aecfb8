"""LoraLinear: a base layer (nn.Linear, GPT-2's Conv1D or QuantLinear) plus named LoRA adapters.

``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's module layout (``base_layer``,
``lora_A.<name>``, ``lora_B.<name>``, ``lora_dropout.<name>``), so state dicts and PEFT's files
line up. Adapters are float32 by default (as PEFT keeps them on a half-precision base).

With one active adapter the layer runs fused (lightllm/ops/lora.py): S = x A^T in float32 and the
rank-r term added in the base GEMM's epilogue, one launch at decode sizes; on a QuantLinear base
the dequant-matmul kernel takes the epilogue, so the packed weight is read once, in training too.
The plain PyTorch path (PEFT's arithmetic) serves several active adapters, dropout while
training, autocast, and bases whose weight is not x's dtype; the results agree either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # where the global forward hooks live

from ..ops import lora as ops_lora
from .quant_linear import QuantLinear


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a Linear whose weight is stored [in_features, out_features]."""
    return type(module).__name__ == "Conv1D"


def _plain_layer(module: nn.Module) -> bool:
    """Whether the fused ops may stand in for ``module``'s forward: exactly nn.Linear, Conv1D or
    QuantLinear, with no forward replaced on the instance and no hooks to run."""
    if not (type(module) in (nn.Linear, QuantLinear) or is_conv1d(module)):
        return False
    if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
        return False
    return not (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a GPT-2 Conv1D or a QuantLinear."""
    if isinstance(base, (nn.Linear, QuantLinear)):
        return base.in_features, base.out_features
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"LoRA wraps nn.Linear, Conv1D or QuantLinear, not {type(base).__name__}")


class LoraLinear(nn.Module):
    """A base layer plus named low-rank adapters (PEFT's layout)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init=True) -> None:
        """A new adapter of rank ``r``: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros, so it
        changes nothing until trained (``init=False``: B random too; ``"gaussian"``: A normal)."""
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {r!r}")
        weight = self._base_weight_like()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init is False:  # PEFT: random B too (for tests of non-trivial adapters)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.normal_(self.lora_B[name].weight, std=1.0 / r)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        if name not in self.active_adapters:
            self.active_adapters = [name]

    def _base_weight_like(self) -> torch.Tensor:
        b = self.base_layer
        return b.scales if isinstance(b, QuantLinear) else b.weight

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, as [out_features, in_features] in float32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged into the base weight; unmerge them to disable them")
            return base(x)
        adapters = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not adapters:
            return base(x)
        if len(adapters) == 1:
            y = self._fused_forward(x, adapters[0])
            if y is not None:
                return y
        y = base(x)
        for name in adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            lora = b(a(self.lora_dropout[name](x).to(a.weight.dtype)))
            y = y + (self.scaling[name] * lora).to(y.dtype)
        return y

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """One adapter through the fused ops, or None where the plain path must serve."""
        dropout = self.lora_dropout[name]
        if dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None  # the mask applies to the adapter's input only: the plain path, same results
        if torch.is_autocast_enabled(x.device.type):
            return None  # autocast decides the dtypes per op, as in PEFT
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        base = self.base_layer
        if not _plain_layer(base):
            return None  # a subclass with its own forward, or hooks (accelerate's offload): run it as it is
        scale = self.scaling[name]
        if isinstance(base, QuantLinear):
            if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
                return base.lora_linear(x, a, b, scale)
            return base.forward_with_lora(x, lora_a=a, lora_b=b, lora_scale=scale)
        weight = base.weight.t() if is_conv1d(base) else base.weight
        if x.dtype != weight.dtype or weight.dim() != 2 or tuple(weight.shape) != (self.out_features, self.in_features):
            return None  # e.g. a quantized nn.Linear subclass from another library
        y = ops_lora.lora_linear(x.reshape(-1, self.in_features), weight, base.bias, a, b, scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str], requantize: bool = False) -> None:
        """Add ``scaling * B A`` of each adapter into the base weight. A quantized base cannot hold
        the sum exactly: with ``requantize=True`` the merged weight is quantized again
        (round-to-nearest on the layer's grid kind; lossy), otherwise it is an error."""
        base = self.base_layer
        if isinstance(base, QuantLinear) and not requantize:
            raise ValueError("cannot merge a LoRA adapter into a quantized (QuantLinear) base exactly; pass "
                             "requantize=True to quantize the merged weight again (lossy), or dequantize the model")
        for name in names:
            if name in self.merged_adapters:
                continue
            self._add_to_base(self.delta_weight(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again (exact up to rounding on a dense base; a requantized
        quantized base is quantized once more)."""
        while self.merged_adapters:
            self._add_to_base(-self.delta_weight(self.merged_adapters.pop()))

    def _add_to_base(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, QuantLinear):
            base.requantize_(base.dequantize(torch.float32) + delta.to(base.qweight.device))
            return
        w = base.weight
        w.add_(delta.t() if is_conv1d(base) else delta)  # float32 delta: one rounding to w's dtype

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A.keys())}, active={self.active_adapters}"
