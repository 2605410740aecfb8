"""Prompt learning: prefix tuning, prompt tuning and P-tuning (config.py: PEFT's configs; layer.py:
the prompt encoders; model.py: injection through transformers' Cache API, generate(), PEFT's files)."""

from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from .model import PromptLearningModel

__all__ = ["PrefixTuningConfig", "PromptEncoderConfig", "PromptLearningConfig", "PromptLearningModel",
           "PromptTuningConfig"]
