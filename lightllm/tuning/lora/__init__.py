"""LoRA with PEFT's configuration, layout and files (config.py, layer.py, model.py)."""

from .config import LoraConfig
from .layer import LoraLinear
from .model import LoraModel

__all__ = ["LoraConfig", "LoraLinear", "LoraModel"]
