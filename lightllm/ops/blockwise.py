"""Ops ``lightllm::quantize_blockwise`` and ``lightllm::dequantize_blockwise``.

Semantics (bitsandbytes' block-wise quantization, defined here by the reference and followed
bit for bit by every backend):

* The flat input is split into blocks of ``blocksize`` values (the last block may be short).
  ``absmax[b]`` is the largest |x| in block b, in float32.
* Each value is normalized as ``x * inv`` with ``inv = 1 / absmax`` (IEEE division; 0 when the
  block is all zeros) and gets the index of the nearest ``code`` value: the number of midpoints
  ``(code[i] + code[i+1]) * 0.5`` strictly below it. A value exactly on a midpoint takes the lower
  index.
* Dequantization is ``code[c] * absmax`` in float32, rounded once to the output dtype.
* Non-finite input poisons only its own block: a NaN makes the block's absmax NaN, an inf makes it
  inf, and every value of that block dequantizes to NaN or +-inf. Other blocks are unaffected.
"""

from __future__ import annotations

import weakref

import torch

from .. import _native
from ..backends import register, resolve

QUANTIZE = "quantize_blockwise"
DEQUANTIZE = "dequantize_blockwise"


# ---- reference (pure PyTorch, any device) ---------------------------------------------------

def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between neighbouring values of a sorted 256-value map."""
    return (code[:-1] + code[1:]) * 0.5


def _as_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)


def quantize_blockwise_reference(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    blocks = _as_blocks(x.reshape(-1).to(torch.float32), blocksize)
    absmax = blocks.abs().amax(dim=1)  # amax propagates NaN
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normalized = (blocks * inv[:, None]).reshape(-1)[: x.numel()]
    codes = torch.searchsorted(midpoints(code), normalized, right=False)  # count of midpoints < v
    codes = torch.where(torch.isnan(normalized), torch.zeros_like(codes), codes)
    return codes.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_reference(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                                   blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    blocks = _as_blocks(codes.reshape(-1), blocksize)
    # index_select with int32 indices: the same gather as code[blocks.long()] without the int64 copy
    # of every index (35x faster on the CPU for a 4096 x 4096 layer's double-quantized absmax)
    values = code.index_select(0, blocks.reshape(-1).int()).view(blocks.shape) * absmax.reshape(-1, 1)
    return values.reshape(-1)[: codes.numel()].to(dtype).view(codes.shape)


# ---- the custom ops -------------------------------------------------------------------------

@torch.library.custom_op("lightllm::quantize_blockwise", mutates_args=())
def quantize_blockwise_op(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, impl = resolve(QUANTIZE, x.device)
    return impl(x, code, blocksize)


@quantize_blockwise_op.register_fake
def _(x, code, blocksize):
    n_blocks = (x.numel() + blocksize - 1) // blocksize
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((n_blocks,), dtype=torch.float32)


@torch.library.custom_op("lightllm::dequantize_blockwise", mutates_args=())
def dequantize_blockwise_op(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                            dtype: torch.dtype) -> torch.Tensor:
    _, impl = resolve(DEQUANTIZE, codes.device)
    return impl(codes, absmax, code, blocksize, dtype)


@dequantize_blockwise_op.register_fake
def _(codes, absmax, code, blocksize, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


# ---- backend implementations ----------------------------------------------------------------

register(QUANTIZE, "torch", ("cpu", "cuda"))(quantize_blockwise_reference)
register(DEQUANTIZE, "torch", ("cpu", "cuda"))(dequantize_blockwise_reference)


@register(QUANTIZE, "cpp", ("cpu",))
def _quantize_cpp(x, code, blocksize):
    return _native.cpp_module().quantize_blockwise(x, code, blocksize)


@register(QUANTIZE, "cuda", ("cuda",))
def _quantize_cuda(x, code, blocksize):
    return _native.cuda_module().quantize_blockwise(x, code, blocksize)


@register(DEQUANTIZE, "cpp", ("cpu",))
def _dequantize_cpp(codes, absmax, code, blocksize, dtype):
    return _native.cpp_module().dequantize_blockwise(codes, absmax, code, blocksize, dtype)


@register(DEQUANTIZE, "cuda", ("cuda",))
def _dequantize_cuda(codes, absmax, code, blocksize, dtype):
    return _native.cuda_module().dequantize_blockwise(codes, absmax, code, blocksize, dtype)


class _PerMapCache:
    """Caches a small tensor derived from a code map, valid while that exact map is unchanged.

    Keyed by the map object itself (a weak reference, so a new tensor that happens to reuse a freed
    address can never hit) and its version counter (bumped by in-place writes).
    """

    def __init__(self, derive):
        self._derive = derive
        self._entries: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def __call__(self, code: torch.Tensor) -> torch.Tensor:
        entry = self._entries.get(id(code))
        if entry is not None and entry[0]() is code and entry[1] == code._version:
            return entry[2]
        derived = self._derive(code)
        if len(self._entries) > 64:
            self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
        self._entries[id(code)] = (weakref.ref(code), code._version, derived)
        return derived


def _triton_search_tables(code: torch.Tensor):
    """Midpoints (+inf sentinel), per-bucket start indices and the most midpoints in a bucket.

    Bucket of a float = top 14 bits of its order-preserving bit pattern (see kernels/blockwise.py).
    Built once per map; the .item() below is the only host synchronization, paid once per map
    (so use a new map once before capturing a CUDA graph that quantizes with it).
    """
    from ..kernels.blockwise import BUCKET_BITS

    mid = midpoints(code.float()) + 0.0  # -0 -> +0: keys then order exactly like the floats compare
    bits = mid.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)
    bucket = key >> (32 - BUCKET_BITS)
    all_buckets = torch.arange(2**BUCKET_BITS, device=code.device, dtype=torch.int64)
    bucket_start = torch.searchsorted(bucket, all_buckets, right=False).to(torch.uint8)  # midpoints below
    steps = int(torch.bincount(bucket, minlength=2**BUCKET_BITS).max().item())
    table = torch.cat([mid, code.new_full((1,), float("inf"))]).contiguous()  # last probe index is 255
    return table, bucket_start, steps


_search_tables = _PerMapCache(_triton_search_tables)


@register(QUANTIZE, "triton", ("cuda", "cpu"))
def _quantize_triton(x, code, blocksize):
    from ..kernels import blockwise as triton_blockwise

    table, bucket_start, steps = _search_tables(code)
    return triton_blockwise.quantize_blockwise(x, table, bucket_start, steps, blocksize)


@register(DEQUANTIZE, "triton", ("cuda", "cpu"))
def _dequantize_triton(codes, absmax, code, blocksize, dtype):
    from ..kernels import blockwise as triton_blockwise

    return triton_blockwise.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
