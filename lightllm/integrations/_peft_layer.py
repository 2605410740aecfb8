"""The LoRA layer lightllm registers with peft (see lightllm/integrations/peft.py). Imports peft."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..tuning.layers import base_layer_kind, supported_base_layers
from ..tuning.lora.layer import fused_lora_forward

# What peft's LoraConfig may ask for that this layer implements (the rest raises, never ignored).
_INITS = (True, False, "gaussian")


class LightllmLoraLinear(nn.Module, LoraLayer):
    """peft's LoRA on a lightllm layer (QuantLinear, Linear4bit, Linear8bitLt): peft's LoraLayer
    state and interface, lightllm's fused forward and backward, merges that requantize."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, ephemeral_gpu_offload=kwargs.get("ephemeral_gpu_offload", False))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        kind = base_layer_kind(module)
        if kind is None:
            raise TypeError(f"LightllmLoraLinear wraps {supported_base_layers()}, not {type(module).__name__}")
        return kind.features(module)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        refused = [name for name in ("use_dora", "use_qalora", "lora_bias") if getattr(config, name, False)]
        refused += [name for name in ("velora_config", "arrow_config") if getattr(config, name, None) is not None]
        if refused:
            raise ValueError(f"LightllmLoraLinear (lightllm's LoRA on {type(self.get_base_layer()).__name__}) does not "
                             f"implement {', '.join(refused)}; leave {'them' if len(refused) > 1 else 'it'} unset")
        if config.init_lora_weights not in _INITS:
            raise ValueError(f"LightllmLoraLinear: init_lora_weights={config.init_lora_weights!r} is not supported on "
                             "a quantized layer (True, False or 'gaussian')")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # float32 adapters, as lightllm's own LoRA keeps them (peft would take a 4-bit layer's compute dtype)
        self.lora_A[adapter_name].float()
        self.lora_B[adapter_name].float()

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is not None:  # peft's mixed batch (one adapter per sample): its plain path
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) == 1 and not args and not kwargs:
            name = active[0]
            y = fused_lora_forward(base, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                   self.lora_dropout[name])
            if y is not None:
                return y
        result = base(x, *args, **kwargs)
        for name in active:
            a = self.lora_A[name]
            lora = self.lora_B[name](a(self.lora_dropout[name](self._cast_input_dtype(x, a.weight.dtype))))
            result = result + (lora * self.scaling[name]).to(result.dtype)
        return result

    # ---- merging ----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A, as [out_features, in_features] in float32."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add each adapter's delta weight to the base layer; a quantized base quantizes the sum
        again (round-to-nearest on its own grid: lossy)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        kind = base_layer_kind(base)
        if kind.quantized:
            warnings.warn(f"merging LoRA into a quantized {kind.name} quantizes the merged weight again "
                          "(round-to-nearest): outputs change by up to half a quantization step", stacklevel=2)
        for name in names:
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            kind.add_to_weight(base, delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again (a quantized base is quantized once more)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        kind = base_layer_kind(base)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                kind.add_to_weight(base, -self.get_delta_weight(name))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
