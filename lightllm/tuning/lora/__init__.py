"""LoRA with PEFT's configuration, layout and files (config.py, layer.py, model.py)."""

from ..mapping import from_pretrained, get_peft_model  # the names lightllm.tuning.lora had before the split
from ..tuner import ModulesToSaveWrapper
from .config import LoraConfig
from .layer import LoraLinear
from .model import LoraModel

__all__ = ["LoraConfig", "LoraLinear", "LoraModel", "ModulesToSaveWrapper", "from_pretrained", "get_peft_model"]
