"""Configs of the GPTQ-format methods: ``gptq`` (calibrated, the GPTQ solver) and ``rtn`` (round
to nearest on the same grid). Both store :class:`~lightllm.nn.QuantLinear` layers and write the
``quantization_config`` AutoGPTQ, GPTQModel and transformers read (``quant_method: "gptq"``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core import QuantizationConfig, register_format, register_method
from . import format as gptq_format

METHODS = ("gptq", "rtn")


@dataclass
class QuantConfig(QuantizationConfig):
    """What to quantize to and how; the same fields as AutoGPTQ's ``quantize_config.json``.

    bits: 2, 3, 4 or 8.  group_size: input columns per group, -1 for one per output row.
    sym: symmetric grids (zero fixed at the middle).  desc_act: act-order (columns by decreasing
    Hessian diagonal).  static_groups: compute every group's grid before the solve (act-order then
    keeps g_idx = k // group_size).  damp_percent: damping as a fraction of mean(diag(H)).
    true_sequential: quantize a block's Linears in forward order.  method: "gptq" or "rtn"
    (:class:`GPTQConfig` and :class:`RTNConfig` fix it).
    checkpoint_format: zero-point convention of the written tensors ("gptq" v1 or "gptq_v2").
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    method: str = "gptq"
    checkpoint_format: str = "gptq"

    quant_method = "gptq"
    blocks_only = True  # AutoGPTQ's choice: the Linears of the transformer blocks

    def __post_init__(self):
        if self.bits not in gptq_format.GPTQ_BITS:
            raise ValueError(f"{type(self).__name__}: bits must be one of {gptq_format.GPTQ_BITS}, got {self.bits!r}")
        if not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0)):
            raise ValueError(f"{type(self).__name__}: group_size must be a positive int or -1, got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"{type(self).__name__}: method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"{type(self).__name__}: damp_percent must lie in (0, 1), got {self.damp_percent}")
        gptq_format._check_format(self.checkpoint_format)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method == "gptq"

    @property
    def zero_min(self) -> int:
        """The smallest zero point the grid may use: v1 checkpoints store z - 1, so z = 0 cannot be
        written; asymmetric grids for v1 keep z >= 1 (a group whose weights are all positive then
        loses its top level instead of corrupting its neighbours' zeros)."""
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0

    def unsupported(self, out_features: int, in_features: int) -> str | None:
        multiple, _ = gptq_format.values_per_chunk(self.bits)
        if in_features % multiple or out_features % multiple:
            return (f"{self.bits}-bit packing needs in and out features to be multiples of {multiple}, got "
                    f"{in_features} x {out_features}")
        return None

    def make_layer(self, linear: nn.Linear) -> nn.Module:
        if self.method != "rtn":
            return super().make_layer(linear)
        return self.layer_type.from_linear(linear, self.bits, self.group_size, sym=self.sym,
                                       checkpoint_format=self.checkpoint_format)

    def quantize_calibrated(self, model, units, calibration, progress: bool, residency=None) -> int:
        from .calibrated import quantize_blocks_gptq

        return quantize_blocks_gptq(model, units, calibration, self, progress, residency)

    @classmethod
    def layer_types(cls) -> tuple[type, ...]:
        from ...nn.quant_linear import QuantLinear  # it imports this package's format: not at the top

        return (QuantLinear,)

    @property
    def layer_type(self) -> type:
        return self.layer_types()[0]

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` dict that AutoGPTQ, GPTQModel and transformers read."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}
        d["quant_method"] = "gptq"
        # where GPTQModel records its writer; readers ignore what they do not know there
        d["meta"] = {"quantizer": ["lightllm:0.1.0"], "lightllm_method": self.method}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(QuantConfig)} - {"method"}
        kwargs = {k: v for k, v in d.items() if k in names}
        method = (d.get("meta") or {}).get("lightllm_method", "gptq")
        method = method if method in METHODS else "gptq"
        if cls is QuantConfig:
            return cls(**kwargs, method=method)
        return cls(**kwargs)


@register_method("gptq")
@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al. 2022): each block's Linears solved against their input Hessians from
    calibration data, in the GPTQ checkpoint format."""

    method: str = "gptq"

    def __post_init__(self):
        if self.method != "gptq":
            raise ValueError(f"GPTQConfig: method is 'gptq' (use RTNConfig for round to nearest), got {self.method!r}")
        super().__post_init__()


@register_method("rtn")
@dataclass
class RTNConfig(QuantConfig):
    """Round to nearest on GPTQ's grid (no calibration), in the GPTQ checkpoint format."""

    method: str = "rtn"

    def __post_init__(self):
        if self.method != "rtn":
            raise ValueError(f"RTNConfig: method is 'rtn' (use GPTQConfig for GPTQ), got {self.method!r}")
        super().__post_init__()


def _parse_gptq(quant: dict[str, Any]) -> QuantConfig:
    base = QuantConfig.from_dict(quant)
    cls = RTNConfig if base.method == "rtn" else GPTQConfig
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


register_format("gptq", _parse_gptq)
