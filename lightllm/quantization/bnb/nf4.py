"""bitsandbytes' 4-bit quantization (NF4 / FP4, QLoRA's format): ``quantize_4bit``,
``dequantize_4bit`` and the ``QuantState`` that travels with a 4-bit tensor, with bitsandbytes'
names, defaults and serialized keys, so tensors and state dicts move between the two libraries.

Double quantization (``compress_statistics``): the float32 absmax of each block is stored as 8-bit
block-wise codes (blocks of 256, the signed dynamic map) of ``absmax - mean(absmax)``, plus the
mean: 0.127 instead of 0.5 bits of overhead per weight at blocksize 64.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ... import ops  # noqa: F401  (registers torch.ops.lightllm.*)
from ...ops import fourbit as _ops

NESTED_BLOCKSIZE = 256
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type", "blocksize",
               "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_4bit_type(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values of ``"nf4"`` or ``"fp4"``, indexed by code."""
    return _ops.code_table(quant_type, device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class QuantState:
    """What dequantizes a 4-bit tensor: absmax (float32, or uint8 codes when ``nested``), the code
    table, the original shape and dtype, blocksize and quant type; for double quantization the mean
    ``offset`` and ``state2``, the 8-bit state of the absmax (its own absmax, code map, blocksize).

    ``as_dict(packed=True)`` gives bitsandbytes' serialized form (tensors only: the non-tensor
    fields as one uint8 tensor of UTF-8 JSON under ``quant_state.bitsandbytes__<type>``);
    ``from_dict`` reads it, or the unpacked form, with or without a module prefix on the keys."""

    def __init__(self, absmax: torch.Tensor, shape=None, code: torch.Tensor | None = None, blocksize: int | None = None,
                 quant_type: str | None = None, dtype: torch.dtype | None = None, offset: torch.Tensor | None = None,
                 state2: "QuantState | None" = None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def float_absmax(self) -> torch.Tensor:
        """The per-block absmax in float32 (decoded from its 8-bit codes when nested)."""
        if not self.nested:
            return self.absmax.float()
        # the one definition of the decode, the same the matmul_4bit kernels follow
        return _ops.decode_nested_absmax(self.absmax, self.state2.absmax, self.state2.code, self.state2.blocksize,
                                         self.offset.float())

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            fields.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                # a copy of its own: safetensors refuses tensors that share memory
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset),
            })
        if not packed:
            return fields
        tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(json.dumps(rest).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        state = dict(state)
        packed = [k for k, v in state.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in state and len(packed) != 1:
            raise ValueError(f"a 4-bit quant state needs exactly one packed 'quant_state.bitsandbytes__nf4|fp4' "
                             f"tensor or the unpacked fields; found {packed or sorted(state)}")
        if packed:
            key = packed[0]
            suffix = key.rsplit(".", 1)[-1]
            if suffix not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
                raise ValueError(f"unknown packed quant state {key!r} (expected ...bitsandbytes__nf4 or __fp4)")
            try:
                state.update(json.loads(bytes(state.pop(key).cpu().tolist()).decode("utf-8")))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"the packed quant state {key!r} is not valid UTF-8 JSON: {exc}") from None
        state = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}
        unknown = set(state) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"unknown 4-bit quant state fields {sorted(unknown)}")
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - set(state)
        if missing:
            raise ValueError(f"the 4-bit quant state lacks {sorted(missing)}")
        state2 = offset = None
        if "nested_absmax" in state:
            offset = torch.tensor(float(state["nested_offset"]), device=device)
            state2 = cls(absmax=state["nested_absmax"].to(device), code=state["nested_quant_map"].to(device),
                         blocksize=int(state["nested_blocksize"]), dtype=_parse_dtype(state["nested_dtype"]))
        result = cls(absmax=state["absmax"].to(device), shape=state["shape"], code=state["quant_map"].to(device),
                     blocksize=int(state["blocksize"]), quant_type=state["quant_type"],
                     dtype=_parse_dtype(state["dtype"]), offset=offset, state2=state2)
        result.check()
        return result

    def check(self) -> None:
        """Raise ValueError naming what is inconsistent (type, blocksize, dtype, absmax length)."""
        if self.quant_type not in _ops.QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        _check_blocksize(self.blocksize)
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"a 4-bit tensor's dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.shape is not None:
            blocks = -(-math.prod(self.shape) // self.blocksize)
            if self.absmax.numel() != blocks:
                raise ValueError(f"absmax has {self.absmax.numel()} values; shape {tuple(self.shape)} at blocksize "
                                 f"{self.blocksize} needs {blocks}")
        if self.code is not None and self.code.numel() != 16:
            raise ValueError(f"a 4-bit code table has 16 values, got {self.code.numel()}")

    def to(self, device) -> "QuantState":
        """Move the tensors to ``device`` (in place, as bitsandbytes does; returns self)."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device) if self.code is not None else None
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same = (self.shape == other.shape and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and self.dtype == other.dtype and self.nested == other.nested
                and torch.equal(self.absmax.cpu(), other.absmax.cpu()))
        if same and self.nested:
            same = float(self.offset) == float(other.offset) and self.state2 == other.state2
        return same

    def __repr__(self) -> str:
        return (f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested})")


def _parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in a 4-bit quant state (float32, float16 or bfloat16)")
    return _DTYPES[name]


def _check_blocksize(blocksize) -> int:
    if not isinstance(blocksize, int) or blocksize not in _ops.BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    return blocksize


def quantize_4bit(x: torch.Tensor, absmax: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  blocksize: int | None = None, compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``x`` (float32/16, bfloat16) to 4-bit codes, one absmax per ``blocksize`` (default 64)
    values: bitsandbytes' ``quantize_4bit``, with its defaults (FP4, no double quantization) and its
    output, packed bytes ``[ceil(n / 2), 1]`` (viewed as ``quant_storage``) and a :class:`QuantState`.
    Non-finite values are refused (a NaN would silently poison its whole block)."""
    if absmax is not None:
        raise ValueError("quantize_4bit: passing absmax is not supported (bitsandbytes ignores it too)")
    blocksize = _check_blocksize(64 if blocksize is None else blocksize)
    if quant_type not in _ops.QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES.values():
        raise ValueError(f"quantize_4bit takes a float32, float16 or bfloat16 tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if x.numel() == 0:
        raise ValueError("quantize_4bit: the tensor is empty")
    packed, block_absmax = torch.ops.lightllm.quantize_4bit(x.contiguous(), blocksize, quant_type)
    if torch.compiler.is_compiling():
        # no data-dependent branch in a compiled graph (a graph break): it asserts on the tensor instead
        torch._assert_async(torch.isfinite(block_absmax).all(), "quantize_4bit: the tensor holds NaN or inf")
    elif not bool(torch.isfinite(block_absmax).all()):
        bad = int((~torch.isfinite(block_absmax)).nonzero()[0])
        raise ValueError(f"quantize_4bit: block {bad} (values {bad * blocksize}..{(bad + 1) * blocksize - 1}) holds "
                         "NaN or inf")
    if itemsize > 1:
        if packed.numel() % itemsize:
            raise ValueError(f"quant_storage {quant_storage} holds {2 * itemsize} values; {x.numel()} values do not "
                             "fill whole elements")
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)
    code = get_4bit_type(quant_type, x.device)
    if compress_statistics:
        from ... import functional as F

        offset = block_absmax.mean()
        nested_code = F.create_dynamic_map(signed=True).to(x.device)
        codes, nested_absmax = F.quantize_blockwise(block_absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(absmax=codes, shape=x.shape, code=code, blocksize=blocksize, quant_type=quant_type,
                           dtype=x.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=block_absmax, shape=x.shape, code=code, blocksize=blocksize, quant_type=quant_type,
                           dtype=x.dtype)
    if out is not None:
        out.copy_(packed)
        packed = out
    return packed, state


def quantize_nf4(x: torch.Tensor, blocksize: int | None = None, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8):
    return quantize_4bit(x, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4",
                         quant_storage=quant_storage)


def quantize_fp4(x: torch.Tensor, blocksize: int | None = None, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8):
    return quantize_4bit(x, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="fp4",
                         quant_storage=quant_storage)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    return packed.reshape(-1)


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState | None = None, absmax: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, blocksize: int | None = None, quant_type: str = "fp4"
                    ) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: the tensor of ``quant_state.shape`` and ``.dtype`` (or, without
    a state, from ``absmax``, ``blocksize`` and ``quant_type`` with ``out``'s shape and dtype)."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs a quant_state, or absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, blocksize=64 if blocksize is None else blocksize,
                                 quant_type=quant_type, dtype=out.dtype)
    elif not isinstance(quant_state, QuantState) and hasattr(quant_state, "as_dict"):
        quant_state = QuantState.from_dict(quant_state.as_dict(), packed.device)  # bitsandbytes' own QuantState
    quant_state.check()
    data = _as_bytes(packed)
    n = math.prod(quant_state.shape)
    if data.numel() != (n + 1) // 2:
        raise ValueError(f"{data.numel()} bytes of 4-bit codes; shape {tuple(quant_state.shape)} needs {(n + 1) // 2}")
    values = torch.ops.lightllm.dequantize_4bit(data, quant_state.float_absmax(), quant_state.blocksize,
                                                quant_state.quant_type, n, quant_state.dtype)
    result = values.view(quant_state.shape)
    if out is not None:
        out.copy_(result)
        return out
    return result
