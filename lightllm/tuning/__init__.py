"""Parameter-efficient tuning: LoRA with PEFT's configuration, layout and files."""

from .lora import LoraConfig, LoraLinear, LoraModel, ModulesToSaveWrapper, from_pretrained, get_peft_model

__all__ = ["LoraConfig", "LoraLinear", "LoraModel", "ModulesToSaveWrapper", "from_pretrained", "get_peft_model"]
