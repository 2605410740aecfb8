"""LoRA adapters with PEFT's configuration, module layout and files.

``get_peft_model(model, LoraConfig(...))`` wraps every matching layer (nn.Linear, transformers'
GPT-2 Conv1D, lightllm's QuantLinear) in a :class:`LoraLinear`:
``y = base(x) + scaling * lora_B(lora_A(dropout(x)))``, scaling = lora_alpha / r (or / sqrt(r) with
rsLoRA), A initialized like nn.Linear (Kaiming-uniform, a = sqrt(5)) and B with zeros, so a new
adapter changes nothing. Only adapter parameters train, plus what ``bias`` ("all": every bias;
"lora_only": the wrapped layers' biases) and ``modules_to_save`` (a trainable copy of each named
module per adapter, PEFT's ModulesToSaveWrapper) ask for.

Files are PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (adapter name removed), the
trained biases under their parameter names and each modules_to_save copy under the module's own
name; adapters other than "default" in a sub-folder of their name. A load checks every tensor
against the model before it changes anything.

The layers run fused (layer.py): the rank-r term in the base GEMM's epilogue, one launch at decode
sizes; on a QuantLinear base (QLoRA) the dequant-matmul kernel takes it, in training too.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import pattern_value
from ..layers import base_features, is_conv1d
from ..tuner import PREFIX, TunerModel
from .config import LoraConfig
from .layer import LoraLinear

logger = logging.getLogger("lightllm")


class LoraModel(TunerModel):
    """The LoRA-wrapped model (``base_model.model`` is the user's model, as in PEFT)."""

    layer_type = LoraLinear
    config_type = LoraConfig
    method_name = "LoRA"
    layer_bias_value = "lora_only"

    def lora_layers(self) -> dict[str, LoraLinear]:
        return self.tuner_layers()

    def _check_new_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        if self.peft_config and any(c.bias != "none" for c in (config, *self.peft_config.values())):
            raise ValueError("LoraModel supports only one adapter with bias != 'none' (biases are shared by all "
                             "adapters); set bias='none' for every adapter to use several")

    def _plan(self, config: LoraConfig):
        plan = super()._plan(config)
        conv1d = any(is_conv1d(m.base_layer if isinstance(m, LoraLinear) else m) for _, m, _ in plan.layers)
        if conv1d != config.fan_in_fan_out:  # as PEFT does: the flag follows the layers' weight layout
            logger.warning("LoraConfig: fan_in_fan_out=%s does not fit %s; setting it to %s", config.fan_in_fan_out,
                           "GPT-2's Conv1D layers" if conv1d else "nn.Linear layers", conv1d)
            config.fan_in_fan_out = conv1d
        return plan

    def _layer_info(self, name: str, module: nn.Module, config: LoraConfig) -> tuple[int, float]:
        r = pattern_value(name, config.rank_pattern, config.r)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoraConfig: rank of {name} must be an integer >= 1, got {r!r} (rank_pattern)")
        return r, pattern_value(name, config.alpha_pattern, config.lora_alpha)

    def _add_to_layer(self, layer: LoraLinear, adapter_name: str, config: LoraConfig, info, name: str) -> None:
        r, alpha = info
        layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)

    # ---- merging --------------------------------------------------------------------------------
    def merge_adapter(self, requantize: bool = False) -> None:
        """Merge the active adapter into the base weights (``requantize=True`` lets quantized bases
        take it by quantizing the merged weight again, lossy; otherwise they raise)."""
        layers = self.lora_layers()
        quantized = [n for n, layer in layers.items() if layer.base_kind.quantized and layer.active_adapters]
        if quantized and not requantize:  # refused before any layer changes
            raise ValueError(f"cannot merge a LoRA adapter into quantized (QuantLinear) layers exactly ({quantized[0]}"
                             f"{' and more' if len(quantized) > 1 else ''}); pass requantize=True to quantize the "
                             "merged weights again (lossy), or dequantize the model first")
        for layer in layers.values():
            layer.merge(list(layer.active_adapters), requantize=requantize)

    # ---- PEFT files -------------------------------------------------------------------------------
    def _layer_state(self, name: str, layer: LoraLinear, adapter_name: str):
        return {f"{PREFIX}{name}.lora_A.weight": layer.lora_A[adapter_name].weight,
                f"{PREFIX}{name}.lora_B.weight": layer.lora_B[adapter_name].weight}

    def _expected_layer_tensors(self, name, module, info, config, existing, path):
        r, _ = info
        base = module.base_layer if isinstance(module, LoraLinear) else module
        k, n = base_features(base)
        if existing is not None:
            if not (isinstance(module, LoraLinear) and existing in module.lora_A):
                raise ValueError(f"{path}: the file's configuration puts LoRA on {name}, where adapter {existing!r} "
                                 "has none; load it under a new adapter name")
            r = module.lora_A[existing].weight.shape[0]
        return {f"{PREFIX}{name}.lora_A.weight": ("lora_A", name, (r, k)),
                f"{PREFIX}{name}.lora_B.weight": ("lora_B", name, (n, r))}

    def _copy_layer_tensor(self, layer: LoraLinear, kind: str, adapter_name: str, value) -> None:
        dest = getattr(layer, kind)[adapter_name].weight
        dest.copy_(value.to(dest.dtype))
