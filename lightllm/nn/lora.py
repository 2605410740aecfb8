"""Compatibility: LoraLinear moved to lightllm.tuning.lora.layer (each tuning method keeps its layer)."""

from ..tuning.layers import base_layer_kind, base_features, is_conv1d  # noqa: F401
from ..tuning.lora.layer import LoraLinear  # noqa: F401
