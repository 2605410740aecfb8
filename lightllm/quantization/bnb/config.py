"""bitsandbytes-format models: the config transformers writes (``BitsAndBytesConfig``,
``quant_method: "bitsandbytes"``), quantizing a model's Linear layers to NF4 / FP4 (Linear4bit) or
LLM.int8 (Linear8bitLt), and finding those layers in a checkpoint's tensors. A checkpoint
transformers + bitsandbytes write loads with :func:`lightllm.quantization.load_quantized`, and
:func:`~lightllm.quantization.save_quantized` writes one that transformers loads back.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from ..core import QuantizationConfig, is_linear, linear_weight, register_format, register_method, replace_module

logger = logging.getLogger("lightllm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BnbConfig(QuantizationConfig):
    """transformers' ``BitsAndBytesConfig`` fields (the ones that change the stored model).

    4-bit: ``load_in_4bit=True``, ``bnb_4bit_quant_type`` "nf4" or "fp4" (transformers' default is
    fp4; QLoRA uses nf4 with double quantization), ``bnb_4bit_use_double_quant``,
    ``bnb_4bit_compute_dtype`` (None: the input's dtype), ``bnb_4bit_quant_storage``; blocksize 64.
    8-bit: ``load_in_8bit=True``, ``llm_int8_threshold`` (6.0, transformers' default).
    ``llm_int8_skip_modules``: module names left dense besides the output head.
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_quant_storage: str = "uint8"
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_has_fp16_weight: bool = False

    quant_method = "bitsandbytes"
    blocks_only = False  # transformers' choice: every Linear but the output head and the skipped modules

    def __post_init__(self):
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("BnbConfig: exactly one of load_in_4bit and load_in_8bit must be True")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"BnbConfig: bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if isinstance(self.bnb_4bit_compute_dtype, torch.dtype):
            self.bnb_4bit_compute_dtype = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES and not (name.endswith("storage") and value == "uint8"):
                raise ValueError(f"BnbConfig: {name} must be one of float32, float16, bfloat16"
                                 f"{', uint8' if name.endswith('storage') else ''}, got {value!r}")
        if self.llm_int8_threshold < 0:
            raise ValueError(f"BnbConfig: llm_int8_threshold must be >= 0, got {self.llm_int8_threshold}")
        if self.llm_int8_has_fp16_weight:
            raise ValueError("BnbConfig: llm_int8_has_fp16_weight=True keeps dense weights; nothing to store quantized")

    @property
    def method(self) -> str:
        return self.bnb_4bit_quant_type if self.load_in_4bit else "int8"

    @classmethod
    def nf4(cls, double_quant: bool = True, compute_dtype: str | None = None) -> "BnbConfig":
        """QLoRA's base: NF4 with double quantization."""
        return NF4Config(double_quant, compute_dtype)

    @classmethod
    def fp4(cls, double_quant: bool = False, compute_dtype: str | None = None) -> "BnbConfig":
        return FP4Config(double_quant, compute_dtype)

    @classmethod
    def int8(cls, threshold: float = 6.0) -> "BnbConfig":
        return Int8Config(threshold)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` transformers writes and reads."""
        d = dataclasses.asdict(self)
        d["bnb_4bit_compute_dtype"] = self.bnb_4bit_compute_dtype or "float32"
        d.update(quant_method="bitsandbytes", _load_in_4bit=self.load_in_4bit, _load_in_8bit=self.load_in_8bit,
                 llm_int8_enable_fp32_cpu_offload=False)
        # the writer's mark: lightllm's transformers integration loads files carrying it into lightllm's
        # layers (transformers' BitsAndBytesConfig ignores keys it does not know)
        d["lightllm"] = {"method": self.method}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BnbConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("load_in_4bit", bool(d.get("_load_in_4bit", False)))
        kwargs.setdefault("load_in_8bit", bool(d.get("_load_in_8bit", False)))
        config = BnbConfig(**kwargs)
        return config.as_method_config()

    def as_method_config(self) -> "BnbConfig":
        """The same config as an NF4Config / FP4Config / Int8Config where one describes it exactly
        (what ``quantize_`` was given, so a saved and reloaded config compares equal), else itself."""
        if self.load_in_4bit:
            cls = NF4Config if self.bnb_4bit_quant_type == "nf4" else FP4Config
            candidate = cls(self.bnb_4bit_use_double_quant, self.bnb_4bit_compute_dtype, self.bnb_4bit_quant_storage,
                            self.llm_int8_skip_modules)
        else:
            candidate = Int8Config(self.llm_int8_threshold, self.llm_int8_skip_modules)
            for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                         "bnb_4bit_quant_storage"):  # 4-bit settings an int8 layer never reads
                setattr(candidate, name, getattr(self, name))
        return candidate if dataclasses.asdict(candidate) == dataclasses.asdict(self) else self

    def compute_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.bnb_4bit_compute_dtype) if self.bnb_4bit_compute_dtype else None

    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bnb_4bit_quant_storage == "uint8" else _DTYPES[self.bnb_4bit_quant_storage]

    # The layer classes import this package's formats: imported where used, not at the top.
    @classmethod
    def layer_types(cls) -> tuple[type, ...]:
        from ...nn.linear4bit import Linear4bit
        from ...nn.linear8bit import Linear8bitLt

        return (Linear4bit, Linear8bitLt)

    @property
    def layer_type(self) -> type:
        linear4bit, linear8bit = self.layer_types()
        return linear4bit if self.load_in_4bit else linear8bit

    def skip_pattern(self) -> str:
        names = ["lm_head", *(self.llm_int8_skip_modules or [])]
        return r"(^|\.)(" + "|".join(re.escape(n) for n in names) + r")$"

    def make_layer(self, linear: nn.Module) -> nn.Module:
        Linear4bit, Linear8bitLt = self.layer_types()
        if self.load_in_4bit:
            return Linear4bit.from_linear(linear, self.bnb_4bit_quant_type, self.bnb_4bit_use_double_quant,
                                          self.compute_dtype(), 64, self.storage_dtype())
        return Linear8bitLt.from_linear(linear, threshold=self.llm_int8_threshold)

    def empty_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """A layer on the meta device, for a checkpoint to fill."""
        Linear4bit, Linear8bitLt = self.layer_types()
        if self.load_in_4bit:
            return Linear4bit(in_features, out_features, bias, self.compute_dtype(), self.bnb_4bit_use_double_quant,
                              self.bnb_4bit_quant_type, self.storage_dtype(), device="meta")
        return Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False,
                            threshold=self.llm_int8_threshold, device="meta")


def quantize_model_bnb(model: nn.Module, config: BnbConfig, progress: bool = True) -> nn.Module:
    """Replace the model's Linear layers (not the output head or ``llm_int8_skip_modules``) by
    bitsandbytes-format layers, in place, as transformers' ``load_in_4bit`` / ``load_in_8bit`` does
    (``quantize_(model, config)``)."""
    from ..core import quantize_

    return quantize_(model, config, progress=progress)


@register_method("nf4")
class NF4Config(BnbConfig):
    """NF4 (QLoRA's 4-bit NormalFloat), blocks of 64, double quantization of the absmax by default."""

    def __init__(self, double_quant: bool = True, compute_dtype: str | torch.dtype | None = None,
                 quant_storage: str = "uint8", skip_modules: list[str] | None = None):
        super().__init__(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                         bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage,
                         llm_int8_skip_modules=skip_modules)


@register_method("fp4")
class FP4Config(BnbConfig):
    """bitsandbytes' 4-bit float (e2m1), blocks of 64."""

    def __init__(self, double_quant: bool = False, compute_dtype: str | torch.dtype | None = None,
                 quant_storage: str = "uint8", skip_modules: list[str] | None = None):
        super().__init__(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=double_quant,
                         bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage,
                         llm_int8_skip_modules=skip_modules)


@register_method("int8")
class Int8Config(BnbConfig):
    """LLM.int8(): int8 weights per output row; activation columns with |x| >= threshold multiplied
    in 16-bit (threshold 0: none)."""

    def __init__(self, threshold: float = 6.0, skip_modules: list[str] | None = None):
        super().__init__(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip_modules)


register_format("bitsandbytes", BnbConfig.from_dict)


def install_bnb_layers(model: nn.Module, state: dict[str, torch.Tensor], config: BnbConfig) -> int:
    """Replace every module the checkpoint stores in bitsandbytes' format (a packed 4-bit quant
    state, or an int8 weight with SCB) by an empty layer of ours to load into; the count."""
    marker = ".weight.quant_state.bitsandbytes__" if config.load_in_4bit else ".SCB"
    prefixes = sorted({key.split(marker)[0] for key in state if marker in key})
    from ..checkpoint import CheckpointError

    if not prefixes:
        raise CheckpointError(f"the checkpoint has no {'4-bit' if config.load_in_4bit else 'int8'} layers "
                              f"(no '*{marker}*' tensors)")
    for prefix in prefixes:
        try:
            old = model.get_submodule(prefix)
        except AttributeError as exc:
            raise CheckpointError(f"the checkpoint quantizes {prefix!r}, which this model does not have") from exc
        if not is_linear(old):
            raise CheckpointError(f"{prefix}: a {type(old).__name__}, not a Linear, in this model")
        has_bias = prefix + ".bias" in state
        if old.bias is not None and not has_bias:
            raise CheckpointError(f"the checkpoint lacks {prefix}.bias (the model's layer has a bias)")
        out_features, in_features = linear_weight(old).shape  # GPT-2's Conv1D stores [in, out]
        replace_module(model, prefix, config.empty_layer(in_features, out_features, has_bias))
    return len(prefixes)


QUANT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB")


def keeps_its_dtype(key: str) -> bool:
    """Tensors of the quantization state, stored as they are (never cast with the dense weights)."""
    last = key.rsplit(".", 1)[-1]
    return last in QUANT_STATE_KEYS or ".quant_state." in key
