"""LoraConfig: PEFT's fields and defaults (the ones lightllm implements)."""

from __future__ import annotations

import dataclasses

from ..config import TunerConfig, register_config


@register_config
@dataclasses.dataclass
class LoraConfig(TunerConfig):
    """PEFT's LoraConfig fields and defaults (the ones lightllm implements)."""

    PEFT_TYPE = "LORA"
    # PEFT options that change the math and that lightllm does not implement: refused, never ignored.
    REFUSED = {
        "use_dora": lambda v: bool(v),
        "lora_bias": lambda v: bool(v),
        "layer_replication": lambda v: v is not None,
        "target_parameters": lambda v: bool(v),
        "use_qalora": lambda v: bool(v),
        "megatron_config": lambda v: v is not None,
        "trainable_token_indices": lambda v: v is not None,
        "alora_invocation_tokens": lambda v: v is not None,
        "velora_config": lambda v: v is not None,
        "monteclora_config": lambda v: v is not None,
        "use_bdlora": lambda v: bool(v),
        "arrow_config": lambda v: v is not None,
        "kasa_config": lambda v: v is not None,
        "ensure_weight_tying": lambda v: bool(v),
    }

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported "
                             "(True, False or 'gaussian')")
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig: peft_type must be 'LORA', got {self.peft_type!r}")
        self._normalize_targets()
