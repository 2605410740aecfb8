"""AdapterConfig: LLM-Adapters' BottleneckConfig fields and defaults, its placements and default
targets per model type, and named presets for the papers' placements (AdapterHub's configs).

A bottleneck adapter is ``A(z) = up(act(down(z)))`` (down: width -> bottleneck, up: back), scaled
by ``scaling`` and added with a skip connection. Where it sits (``placement``), with o = base(x)
the frozen layer's output and r the residual stream entering the sublayer the layer ends:

===================  ==============================  ==============================================
placement            the wrapped layer computes      who uses it
===================  ==============================  ==============================================
``mh``               ``base(x + s A(x))``            LLM-Adapters' mh_adapter (gate_proj, up_proj)
``output``           ``o + s A(o)``                  LLM-Adapters' output_adapter; Houlsby
                                                     (AdapterHub's double_seq_bn)
``parallel``         ``o + s A(x)``                  LLM-Adapters' parallel_adapter
``output_residual``  ``o + s A(o + r)``              AdapterHub's seq_bn (Pfeiffer) on pre-LN models
``parallel_residual``  ``o + s A(r)``                AdapterHub's par_bn (He et al.'s parallel adapter)
===================  ==============================  ==============================================

``placement=None`` follows LLM-Adapters: ``use_parallel_adapter`` makes every target parallel,
otherwise the target's name decides (LLaMA: gate_proj and up_proj mh, down_proj output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import TunerConfig, register_config

PLACEMENTS = ("mh", "output", "parallel", "output_residual", "parallel_residual")
RESIDUAL_PLACEMENTS = ("output_residual", "parallel_residual")
PRESETS = ("houlsby", "pfeiffer", "parallel")

# Model families that share LLaMA's module names (decoder layers with input_layernorm, self_attn.o_proj,
# post_attention_layernorm and mlp.{gate,up,down}_proj).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")  # not mixtral: its experts are not mlp.down_proj


def _llama_like(table: dict[str, Any]) -> dict[str, Any]:
    return {**table, **{t: table["llama"] for t in LLAMA_LIKE}}


# LLM-Adapters (peft/src/peft/tuners/bottleneck.py, mapping.py), with GPT-2 and LLaMA's relatives added:
# the placement a target gets from its name, and the default targets of each variant.
ADAPTER_TYPE_BY_NAME = _llama_like({
    "llama": {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"},
    "bloom": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gptj": {"fc_in": "mh", "fc_out": "output"},
    "gpt_neo": {"c_fc": "mh", "c_proj": "output"},
    "opt": {"fc1": "mh", "fc2": "output"},
    "chatglm": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gpt2": {"c_fc": "mh", "c_proj": "output"},
})
BOTTLENECK_TARGETS = _llama_like({  # AdapterH, LLM-Adapters' default "bottleneck"
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "bloom": ["dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["fc_in", "fc_out"],
    "gpt_neo": ["c_fc", "c_proj"],
    "opt": ["fc1", "fc2"],
    "chatglm": ["dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_fc", "mlp.c_proj"],
})
ADAPTERP_TARGETS = _llama_like({  # AdapterP (use_adapterp): the FFN's output only
    "llama": ["down_proj"], "bloom": ["dense_4h_to_h"], "gptj": ["fc_out"], "gpt_neo": ["c_proj"], "opt": ["fc2"],
    "chatglm": ["dense_4h_to_h"], "gpt2": ["mlp.c_proj"],
})
PARALLEL_TARGETS = _llama_like({  # use_parallel_adapter
    "llama": ["q_proj", "v_proj", "k_proj"], "bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj", "k_proj"],
    "gpt_neo": ["q_proj", "v_proj", "k_proj"], "opt": ["q_proj", "v_proj", "k_proj"], "chatglm": ["query_key_value"],
    "gpt2": ["c_attn"],
})

# The two sublayers of a decoder layer, for the presets and the residual placements: the module
# whose output is the sublayer's output, and the norm whose input is the residual stream r that
# the sublayer's output is added to (pre-LN models), both relative to the decoder layer.
SUBLAYERS = _llama_like({
    "llama": {"attention": ("self_attn.o_proj", "input_layernorm"), "ffn": ("mlp.down_proj", "post_attention_layernorm")},
    "gpt2": {"attention": ("attn.c_proj", "ln_1"), "ffn": ("mlp.c_proj", "ln_2")},
})

# AdapterHub's presets (adapters' SeqBnConfig, DoubleSeqBnConfig, ParBnConfig) as our placements.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "houlsby": dict(sites=("attention", "ffn"), placement="output", non_linearity="swish", reduction_factor=16,
                    adapter_bias=True, init_weights="bert", scaling=1.0),
    "pfeiffer": dict(sites=("ffn",), placement="output_residual", non_linearity="relu", reduction_factor=16,
                     adapter_bias=True, init_weights="bert", scaling=1.0),
    "parallel": dict(sites=("ffn",), placement="parallel_residual", non_linearity="relu", reduction_factor=2,
                     adapter_bias=True, init_weights="mam_adapter", scaling=4.0),
}


@register_config
@dataclasses.dataclass
class AdapterConfig(TunerConfig):
    """Bottleneck adapters: LLM-Adapters' ``BottleneckConfig`` fields and defaults first
    (``peft_type: "BOTTLENECK"``), then lightllm's additions (all off by default, so a default
    config is LLM-Adapters' and its files are theirs).

    LLM-Adapters' fields: ``bottleneck_size`` (256), ``non_linearity`` (transformers' ACT2FN name,
    "tanh"), ``adapter_dropout`` (on the adapter's input, 0.0), ``target_modules`` (None: the
    variant's default for the model type), ``use_parallel_adapter``, ``use_adapterp`` (only changes
    the default targets), ``scaling`` (a number, or "learned": a trained scalar starting at 1),
    ``bias`` ("none", "all": every bias of the model trains, "adapter_only": the wrapped layers'
    biases), ``init_weights`` ("bert": both projections N(0, 0.02); "mam_adapter": down
    Kaiming-uniform, up zeros, so a new adapter changes nothing), ``modules_to_save``.

    Additions: ``placement`` (see the module's table; None: LLM-Adapters' rule), ``preset``
    (:meth:`from_preset`), ``reduction_factor`` (bottleneck = width // reduction_factor instead of
    bottleneck_size), ``adapter_bias`` (biases on the two projections, as AdapterHub has),
    ``dropout_on_output`` (dropout after the scaling, as AdapterHub applies it), the ``"houlsby"``
    init (truncated normal, std 0.01, zero biases), and PEFT's ``exclude_modules``,
    ``layers_to_transform``, ``layers_pattern``.
    """

    PEFT_TYPE = "BOTTLENECK"

    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_parallel_adapter: bool = False
    use_adapterp: bool = False
    scaling: float | str = 1.0
    bias: str = "none"
    init_weights: str = "bert"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "BOTTLENECK"
    # lightllm's additions
    placement: str | None = None
    preset: str | None = None
    reduction_factor: float | None = None
    adapter_bias: bool = False
    dropout_on_output: bool = False
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self):
        name = "AdapterConfig"
        if self.peft_type != "BOTTLENECK":
            raise ValueError(f"{name}: peft_type must be 'BOTTLENECK', got {self.peft_type!r}")
        if self.reduction_factor is None and (not isinstance(self.bottleneck_size, int) or isinstance(
                self.bottleneck_size, bool) or self.bottleneck_size < 1):
            raise ValueError(f"{name}: bottleneck_size must be an integer >= 1, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and (isinstance(self.reduction_factor, bool)
                                                  or not isinstance(self.reduction_factor, (int, float))
                                                  or self.reduction_factor <= 0):
            raise ValueError(f"{name}: reduction_factor must be a positive number, got {self.reduction_factor!r}")
        # LLM-Adapters checks isinstance(scaling, float) only, so an integer (fire parses "--scaling 1" as
        # one) leaves its layer without a scaling and the forward pass crashes: take any number.
        if isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool):
            self.scaling = float(self.scaling)
        elif self.scaling != "learned":
            raise ValueError(f"{name}: scaling must be a number or 'learned', got {self.scaling!r}")
        if self.bias not in ("none", "all", "adapter_only"):
            raise ValueError(f"{name}: bias must be 'none', 'all' or 'adapter_only', got {self.bias!r}")
        if self.init_weights not in ("bert", "mam_adapter", "houlsby"):
            raise ValueError(f"{name}: init_weights must be 'bert', 'mam_adapter' or 'houlsby', got "
                             f"{self.init_weights!r}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"{name}: adapter_dropout must lie in [0, 1), got {self.adapter_dropout}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"{name}: placement must be one of {PLACEMENTS} (or None), got {self.placement!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"{name}: preset must be one of {PRESETS} (or None), got {self.preset!r}")
        if self.use_parallel_adapter and self.placement not in (None, "parallel", "parallel_residual"):
            raise ValueError(f"{name}: use_parallel_adapter=True contradicts placement={self.placement!r}")
        from ..._extras import require

        ACT2FN = require("transformers.activations", "bottleneck adapters (their activations)").ACT2FN
        if self.non_linearity.lower() not in ACT2FN and self.non_linearity.lower() != "leakyrelu":
            raise ValueError(f"{name}: non_linearity {self.non_linearity!r} is not one of transformers' ACT2FN "
                             "activations")
        self._normalize_targets()

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "AdapterConfig":
        """The papers' placements with AdapterHub's defaults; ``overrides`` replace any field.

        * ``"houlsby"`` (Houlsby et al. 2019; AdapterHub's double_seq_bn): an adapter after the
          attention's output projection and one after the FFN's, each ``o + A(o)`` before the
          residual add; swish, bottleneck = hidden / 16.
        * ``"pfeiffer"`` (Pfeiffer et al. 2021; seq_bn): after the FFN only, reading the FFN's output
          plus the residual stream; relu, hidden / 16.
        * ``"parallel"`` (He et al. 2022; par_bn): beside the FFN, reading the residual stream;
          relu, hidden / 2, scaling 4, up-projection initialized to zero.

        The target modules are found from the model's type when the adapter is added (LLaMA and its
        relatives, GPT-2), unless ``target_modules`` is given.
        """
        if preset not in PRESETS:
            raise ValueError(f"AdapterConfig.from_preset: preset must be one of {PRESETS}, got {preset!r}")
        values = {k: v for k, v in PRESET_VALUES[preset].items() if k != "sites"}
        values.update(overrides)
        return cls(preset=preset, **values)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        # lightllm's additions are written only where they differ from LLM-Adapters' behaviour, so that a
        # default config's file is exactly LLM-Adapters' (its loader ignores keys it does not know).
        defaults = {"placement": None, "preset": None, "reduction_factor": None, "adapter_bias": False,
                    "dropout_on_output": False, "exclude_modules": None, "layers_to_transform": None,
                    "layers_pattern": None}
        for key, default in defaults.items():
            if d[key] == default:
                del d[key]
        return d
