"""Block-wise 8-bit quantization in Triton (semantics in lightllm/ops/blockwise.py).

One program handles a tile of whole quantization blocks laid out as a 2-D [blocks, blocksize]
array, so the per-block absmax is a row reduction and no block straddles programs.

The code of a normalized value v is the number of map midpoints below it. Gathers from the
(L1-resident) tables are the kernel's main cost besides DRAM, so instead of an 8-step binary
search it looks up a bucket table indexed by the top 14 bits of v's order-preserving bit pattern
(sign, exponent, 5 mantissa bits), which gives the number of midpoints below the bucket, then
counts the few midpoints inside the bucket with STEPS compares: 1 + STEPS gathers, 3 for the
dynamic maps. Maps that crowd more than MAX_TABLE_STEPS midpoints into one bucket take the
binary search. The tables are built once per map (see lightllm/ops/blockwise.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Values per program. On a GPU 4096 keeps 16 values per thread at 8 warps. The CPU interpreter
# pays per program, so it gets larger tiles.
_TILE = 4096
_TILE_INTERPRETED = 1 << 16


def _tile_values() -> int:
    return _TILE_INTERPRETED if os.environ.get("TRITON_INTERPRET", "") == "1" else _TILE


BUCKET_BITS = 14
MAX_TABLE_STEPS = 4


@triton.jit
def nearest_code(v, midpoints_ptr, bucket_start_ptr, STEPS: tl.constexpr, USE_TABLE: tl.constexpr):
    """Index of the nearest map value for each normalized value (int32; ties low, NaN -> 0)."""
    if USE_TABLE:
        # Order-preserving key: flip all bits of negatives, only the sign bit of positives.
        bits = v.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) | -2147483648)
        pos = tl.load(bucket_start_ptr + ((key >> (32 - 14)) & 0x3FFF)).to(tl.int32)
        for _ in tl.static_range(STEPS):
            pos += (tl.load(midpoints_ptr + pos) < v).to(tl.int32)
        pos = tl.where(v == v, pos, 0)  # a NaN's key is meaningless: code 0
    else:
        pos = tl.zeros(v.shape, dtype=tl.int32)
        for level in tl.static_range(8):
            # (no `step: tl.constexpr = ...` here: a constexpr cannot be re-bound as the loop unrolls)
            pivot = tl.load(midpoints_ptr + pos + ((128 >> level) - 1))
            pos = tl.where(pivot < v, pos + (128 >> level), pos)
    return pos


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr,
    midpoints_ptr,
    bucket_start_ptr,
    codes_ptr,
    absmax_ptr,
    n_values,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    STEPS: tl.constexpr,
    USE_TABLE: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_range = offsets < n_values
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    # tl.max drops NaN on the GPU; the reference keeps it, so a NaN poisons its block everywhere.
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)
    # IEEE reciprocal (Triton's plain `/` is approximate on the GPU), then one multiply per value.
    safe = tl.where(absmax == 0.0, 1.0, absmax)
    inv = tl.where(absmax == 0.0, 0.0, tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe))
    v = x * inv[:, None]

    pos = nearest_code(v, midpoints_ptr, bucket_start_ptr, STEPS, USE_TABLE)
    tl.store(codes_ptr + offsets, pos.to(tl.uint8), mask=in_range)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


@triton.jit
def _dequantize_blockwise_kernel(
    codes_ptr,
    absmax_ptr,
    map_ptr,
    out_ptr,
    n_values,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_range = offsets < n_values
    codes = tl.load(codes_ptr + offsets, mask=in_range, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0.0)
    values = tl.load(map_ptr + codes) * scale[:, None]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=in_range)


def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device and stream; make that the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_shape(n_values: int, blocksize: int) -> tuple[int, int, int]:
    n_blocks = triton.cdiv(n_values, blocksize)
    blocks_per_program = max(1, _tile_values() // blocksize)
    return n_blocks, blocks_per_program, triton.cdiv(n_blocks, blocks_per_program)


def quantize_blockwise(x: torch.Tensor, midpoints: torch.Tensor, bucket_start: torch.Tensor, steps: int,
                       blocksize: int):
    """Codes (uint8, x's shape) and absmax (float32, one per block).

    ``midpoints``: 256 float32 values, the 255 sorted map midpoints followed by +inf.
    ``bucket_start``: uint8 [2**BUCKET_BITS], midpoints below each bucket; ``steps``: the most
    midpoints in one bucket (``bucket_start`` is ignored when steps > MAX_TABLE_STEPS).
    """
    x = x.contiguous()
    n = x.numel()
    n_blocks, per_program, grid = _launch_shape(n, blocksize)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if n:
        with _on_device_of(x):
            _quantize_blockwise_kernel[(grid,)](
                x, midpoints, bucket_start, codes, absmax, n, n_blocks,
                BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program,
                STEPS=min(steps, MAX_TABLE_STEPS), USE_TABLE=steps <= MAX_TABLE_STEPS, num_warps=8,
            )
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    codes = codes.contiguous()
    n = codes.numel()
    n_blocks, per_program, grid = _launch_shape(n, blocksize)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if n:
        with _on_device_of(codes):
            _dequantize_blockwise_kernel[(grid,)](
                codes, absmax.contiguous(), code.contiguous(), out, n, n_blocks,
                BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, num_warps=8,
            )
    return out
