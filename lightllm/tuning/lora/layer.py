"""LoraLinear: a base layer (any registered kind: nn.Linear, GPT-2's Conv1D, QuantLinear, Linear4bit,
Linear8bitLt) plus named LoRA adapters.

``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's module layout (``base_layer``,
``lora_A.<name>``, ``lora_B.<name>``, ``lora_dropout.<name>``), so state dicts and PEFT's files
line up. Adapters are float32 by default (as PEFT keeps them on a half-precision base).

With one active adapter the layer runs fused (lightllm/ops/lora.py): S = x A^T in float32 and the
rank-r term added in the base GEMM's epilogue, one launch at decode sizes; on a quantized base
(QuantLinear, Linear4bit, a frozen Linear8bitLt) the quantized kernel takes the epilogue, so the
packed weight is read once, in training too.
The plain PyTorch path (PEFT's arithmetic) serves several active adapters, dropout while
training, autocast, and bases whose weight is not x's dtype; the results agree either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ops import lora as ops_lora
from ..layers import TunerLayer, base_layer_kind, runs_as_plain_layer


class LoraLinear(TunerLayer):
    """A base layer plus named low-rank adapters (PEFT's layout)."""

    adapter_module_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init=True) -> None:
        """A new adapter of rank ``r``: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros, so it
        changes nothing until trained (``init=False``: B random too; ``"gaussian"``: A normal)."""
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {r!r}")
        weight = self._base_reference()
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

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.scaling.pop(name, None)

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
        return fused_lora_forward(self.base_layer, x, self.lora_A[name].weight, self.lora_B[name].weight,
                                  self.scaling[name], self.lora_dropout[name])

    # ---- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str], requantize: bool = False) -> None:
        """Add ``scaling * B A`` of each adapter into the base weight. A quantized base cannot hold
        the sum exactly: with ``requantize=True`` the merged weight is quantized again
        (round-to-nearest on the layer's grid kind; lossy), otherwise it is an error."""
        if self.base_kind.quantized and not requantize:
            raise ValueError(f"cannot merge a LoRA adapter into a quantized ({self.base_kind.name}) base exactly; pass "
                             "requantize=True to quantize the merged weight again (lossy), or dequantize the model")
        for name in names:
            if name in self.merged_adapters:
                continue
            self.base_kind.add_to_weight(self.base_layer, self.delta_weight(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again (exact up to rounding on a dense base; a requantized
        quantized base is quantized once more)."""
        while self.merged_adapters:
            self.base_kind.add_to_weight(self.base_layer, -self.delta_weight(self.merged_adapters.pop()))

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A.keys())}, active={self.active_adapters}"


def fused_lora_forward(base: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                       dropout: nn.Module) -> torch.Tensor | None:
    """``base(x) + scale * (dropout(x) a^T) b^T`` through the fused ops for a registered base layer,
    or None where the plain path must serve (dropout while training, autocast, a base that is not
    exactly its kind's plain class, a dense weight not in x's dtype). Shared by LoraLinear and the
    layer lightllm registers with peft (lightllm.integrations.peft)."""
    if dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return None  # the mask applies to the adapter's input only: the plain path, same results
    if torch.is_autocast_enabled(x.device.type):
        return None  # autocast decides the dtypes per op, as in PEFT
    if not runs_as_plain_layer(base):
        return None  # a subclass with its own forward, or hooks (accelerate's offload): run it as it is
    kind = base_layer_kind(base)
    if kind.lora_forward is not None:  # a base with its own fused path (QuantLinear: the kernel's epilogue)
        training = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)
        return kind.lora_forward(base, x, a, b, scale, training)
    weight = kind.dense_weight(base)
    in_features, out_features = kind.features(base)
    if (weight is None or x.dtype != weight.dtype or weight.dim() != 2
            or tuple(weight.shape) != (out_features, in_features)):
        return None  # e.g. a quantized nn.Linear subclass from another library
    y = ops_lora.lora_linear(x.reshape(-1, in_features), weight, base.bias, a, b, scale)
    return y.reshape(*x.shape[:-1], out_features)
