"""Parameter-efficient tuning: one tuner base (config.py, layers.py, tuner.py, save_load.py,
mapping.py) shared by the methods, each a folder of its own (lora/, adapter/).

``get_peft_model(model, config)`` picks the method from the config; ``from_pretrained(model, dir)``
from the adapter folder (PEFT's, LLM-Adapters' or AdapterHub's layout).
"""

from .adapter import AdapterConfig, AdapterLayer, AdapterModel
from .kbit import prepare_model_for_kbit_training
from .layers import BaseLayerKind, TunerLayer, base_layer_kind, register_base_layer
from .lora import LoraConfig, LoraLinear, LoraModel
from .adapter import adapterhub as _adapterhub
from .mapping import FOLDER_READERS, from_pretrained, get_peft_model, register_method
from .prefix import (PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptLearningModel,
                     PromptTuningConfig)
from .tuner import ModulesToSaveWrapper, TunerModel

register_method(LoraModel)
register_method(AdapterModel)
register_method(PromptLearningModel, "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
FOLDER_READERS.append(_adapterhub.read_folder)

__all__ = [
    "AdapterConfig", "AdapterLayer", "AdapterModel", "BaseLayerKind", "PrefixTuningConfig", "PromptEncoderConfig",
    "PromptLearningConfig", "PromptLearningModel", "PromptTuningConfig", "LoraConfig", "LoraLinear", "LoraModel", "ModulesToSaveWrapper", "TunerLayer", "TunerModel",
    "base_layer_kind", "from_pretrained", "get_peft_model", "prepare_model_for_kbit_training", "register_base_layer",
]
