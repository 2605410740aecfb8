"""Configs of the prompt-learning methods: PEFT's PrefixTuningConfig, PromptTuningConfig and
PromptEncoderConfig (P-tuning), their fields and defaults, and the fields PEFT derives from the
model's config when they are left unset (grouped-query attention included)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import TunerConfig, register_config

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


@dataclasses.dataclass
class PromptLearningConfig(TunerConfig):
    """PEFT's PromptLearningConfig fields (shared by the three methods)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def _check_common(self) -> None:
        name = type(self).__name__
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"{name}: peft_type must be {self.PEFT_TYPE!r}, got {self.peft_type!r}")
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens < 1:
            raise ValueError(f"{name}: num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{name}: lightllm's prompt learning serves causal language models (task_type 'CAUSAL_LM'), "
                             f"not {self.task_type!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"{name}: num_transformer_submodules must be 1 (decoder-only models), got "
                             f"{self.num_transformer_submodules!r}")
        if self.modules_to_save:
            raise ValueError(f"{name}: modules_to_save is not supported with prompt learning in lightllm")

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in super().to_dict().items()}


@register_config
@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang): trainable keys and values prepended in every layer.
    ``prefix_projection`` trains them through Embedding -> Linear -> Tanh -> Linear (the
    reparameterization); ``init_weights="zero"`` zeroes the last layer (or the embedding)."""

    PEFT_TYPE = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    peft_type: str = "PREFIX_TUNING"

    def __post_init__(self):
        self._check_common()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}")


@register_config
@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.): trainable input embeddings prepended to the prompt, initialized
    RANDOM (normal), from TEXT (the embeddings of ``prompt_tuning_init_text`` tokenized with
    ``tokenizer_name_or_path``, repeated or cut to length) or SAMPLE_VOCAB (random tokens')."""

    PEFT_TYPE = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    peft_type: str = "PROMPT_TUNING"

    def __post_init__(self):
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        self._check_common()
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(f"PromptTuningConfig: prompt_tuning_init must be RANDOM, TEXT or SAMPLE_VOCAB, got "
                             f"{self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError("PromptTuningConfig: TEXT init needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("PromptTuningConfig: tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@register_config
@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al.): virtual token embeddings produced by a prompt encoder, an MLP
    (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM followed by Linear-ReLU-Linear."""

    PEFT_TYPE = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    peft_type: str = "P_TUNING"

    def __post_init__(self):
        self.encoder_reparameterization_type = getattr(self.encoder_reparameterization_type, "value",
                                                       self.encoder_reparameterization_type)
        self._check_common()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(f"PromptEncoderConfig: encoder_reparameterization_type must be MLP or LSTM, got "
                             f"{self.encoder_reparameterization_type!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig: encoder_dropout must lie in [0, 1), got {self.encoder_dropout}")


def _text_config(model_config):
    get = getattr(model_config, "get_text_config", None)
    return get(decoder=True) if callable(get) else model_config


def _first(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def prepare_config(config: PromptLearningConfig, model_config) -> PromptLearningConfig:
    """Fill the fields left unset from the model's config, as PEFT does: layers, hidden size, heads;
    for prefix tuning with grouped-query attention token_dim = head_dim * num_key_value_heads and
    num_attention_heads = num_key_value_heads (an explicit ``head_dim`` honoured); the encoder's
    hidden size defaults to token_dim. Checks what must divide."""
    name = type(config).__name__
    text = _text_config(model_config)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_layers is None:
        config.num_layers = _first(text, ("num_hidden_layers", "num_layers", "n_layer"))
        if config.num_layers is None:
            raise ValueError(f"{name}: the model's config has no number of layers; set num_layers")
    if config.token_dim is None:
        config.token_dim = _first(text, ("hidden_size", "n_embd", "d_model"))
        if config.token_dim is None:
            raise ValueError(f"{name}: the model's config has no hidden size; set token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(text, ("num_attention_heads", "n_head", "num_heads"))
        if config.num_attention_heads is None:
            raise ValueError(f"{name}: the model's config has no number of attention heads; set num_attention_heads")
    kv_heads = getattr(text, "num_key_value_heads", None)
    if config.PEFT_TYPE == "PREFIX_TUNING" and kv_heads is not None:
        head_dim = getattr(text, "head_dim", None)
        if head_dim is None:
            if config.token_dim % config.num_attention_heads:
                raise ValueError(f"{name}: hidden size {config.token_dim} is not divisible by "
                                 f"{config.num_attention_heads} attention heads")
            head_dim = config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"{name}: token_dim {config.token_dim} is not divisible by num_attention_heads "
                         f"{config.num_attention_heads}")
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    return config
