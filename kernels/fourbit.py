"""bitsandbytes' 4-bit NF4 / FP4 weights in Triton: the dequantization and, for up to 16 rows of x,
a GEMV that reads the packed weight once (format and reference in lightllm/ops/fourbit.py).

The weight W [N, K] is one flat stream of 4-bit codes, two per byte, the first value in the high
nibble; block b of ``blocksize`` values has the float32 scale ``absmax[b]``, or, double-quantized,
the uint8 code ``absmax[b]`` decoded here as ``nested_code[c] * nested_absmax[b // nested_blocksize]
+ offset`` (float32, no fused multiply-add: the bits of ``QuantState.float_absmax``).

GEMV (``matmul_4bit``, M <= 16, K even): each program owns BLOCK_N output columns and walks its
slice of K one [BLOCK_KB bytes, BLOCK_N rows] tile at a time: each byte is loaded once and gives
two codes, the high nibble for the even column of x and the low one for the odd column; codes go
through the 16-entry table (an L1-resident gather) and are scaled by their block's absmax. When K
is a multiple of the blocksize and a tile's 2 * BLOCK_KB values fit in one block (ALIGNED) a row
of the tile has one absmax, loaded (and decoded) once per row; otherwise blocks straddle rows of W
(flat index n * K + k) and the absmax is gathered per byte (both values of a byte share a block:
the blocksize is even and K is even). One row of x: products summed in float32 without rounding
the weight (a CUDA-core GEMV); 2 to 16 rows: the weight tile rounded to x's dtype (the
reference's rounding) and tl.dot with float32 accumulation (IEEE float32 for float32 x). K is
sliced over programs by the split reduction of kernels/_common.py where the output has too few
column tiles to fill the GPU; bias and the one rounding to x's dtype in the epilogue.

Odd K (rows start mid-byte) and more than 16 rows go to the dequantize kernel + torch's matmul
(cuBLAS on a GPU): the reference's bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import arrive, lora_term, device_guard, interpreted, sm_count, split_counters, split_launch, sum_partials

GEMV_MAX_ROWS = 16
# no fused multiply-add: the nested absmax decode must give QuantState.float_absmax's bits
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, block, mask,
                 nested_blocksize, NESTED: tl.constexpr):
    """The float32 absmax of quantization blocks ``block`` (decoded from uint8 codes when NESTED)."""
    if NESTED:
        c = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + c) * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask,
                                                        other=0.0)
        return scale + tl.load(nested_offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, code_ptr,
                            out_ptr, n, blocksize, nested_blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """Values 2 * BLOCK * pid ... of the flat weight: BLOCK bytes, each read once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    first = 2 * offs  # the value in the high nibble
    ok = first < n
    byte = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, first // blocksize, ok,
                         nested_blocksize, NESTED)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 15)) * scale
    values = tl.reshape(tl.join(hi, lo), (2 * BLOCK,)).to(out_ptr.dtype.element_ty)
    offs2 = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs2, values, mask=offs2 < n)


@triton.jit
def _matmul_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, code_ptr, bias_ptr,
    out_ptr, ws_ptr, counter_ptr, lora_s_ptr, lora_b_ptr, lora_scale,
    M, N, K, stride_xm, blocksize, nested_blocksize, R,
    NESTED: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    USE_DOT: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out [M, N] = x [M, K] @ W^T (+ bias) (+ lora_scale * S B^T, S [M, R] and B [N, R] float32:
    LoRA's rank-R term in the epilogue, so the layer with its adapter reads W once); K even;
    program (column tile, K slice)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    row_bytes = K // 2
    row_start = offs_n.to(tl.int64) * row_bytes  # [BLOCK_N] byte where row n of W starts
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(pid_k * BLOCK_KB, row_bytes, BLOCK_KB * SPLIT_K):
        offs_kb = kb0 + tl.arange(0, BLOCK_KB)
        kb_ok = offs_kb < row_bytes
        tile_ok = kb_ok[:, None] & n_ok[None, :]
        byte_index = row_start[None, :] + offs_kb[:, None]  # [BLOCK_KB, BLOCK_N]: W^T's layout
        byte = tl.load(packed_ptr + byte_index, mask=tile_ok, other=0).to(tl.int32)
        if ALIGNED:  # the tile's values of row n all lie in block (n * K + 2 * kb0) // blocksize
            scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                 (2 * (row_start + kb0)) // blocksize, n_ok, nested_blocksize, NESTED)[None, :]
        else:
            scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                 (2 * byte_index) // blocksize, tile_ok, nested_blocksize, NESTED)
        w_hi = tl.load(code_ptr + (byte >> 4)) * scale  # columns 2 * offs_kb of x
        w_lo = tl.load(code_ptr + (byte & 15)) * scale  # columns 2 * offs_kb + 1
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + 2 * offs_kb[None, :]
        x_mask = m_ok[:, None] & kb_ok[None, :]
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=x_mask, other=0.0)
        if USE_DOT:
            if FP32_DOT:
                acc = tl.dot(x_even, w_hi, acc, input_precision="ieee")
                acc = tl.dot(x_odd, w_lo, acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, w_hi.to(x_even.dtype), acc)
                acc = tl.dot(x_odd, w_lo.to(x_odd.dtype), acc)
        else:  # BLOCK_M == 1: a plain GEMV in float32
            xe = tl.reshape(x_even.to(tl.float32), (BLOCK_KB, 1))
            xo = tl.reshape(x_odd.to(tl.float32), (BLOCK_KB, 1))
            acc += tl.reshape(tl.sum(w_hi * xe + w_lo * xo, axis=0), (1, BLOCK_N))

    out_mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            acc += lora_scale * lora_term(lora_s_ptr, lora_b_ptr, offs_m, offs_n, m_ok, n_ok, R, BLOCK_M, BLOCK_N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # [SPLIT_K, M, N]
        tl.store(ws + pid_k * M * N, acc, mask=out_mask)
        if arrive(counter_ptr + pid_n) == SPLIT_K - 1:
            total = sum_partials(ws, M * N, out_mask, SPLIT_K)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_LORA:
                total += lora_scale * lora_term(lora_s_ptr, lora_b_ptr, offs_m, offs_n, m_ok, n_ok, R, BLOCK_M,
                                                 BLOCK_N)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter_ptr + pid_n, 0)


# ---- launchers --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    from lightllm.ops.fourbit import code_table

    return code_table(quant_type, device)


def _nested_pointers(absmax, nested):
    """(nested_absmax, nested_code, nested_offset as a float32 [1] tensor, nested_blocksize, NESTED)."""
    if nested is None:
        return absmax, absmax, absmax, 256, False
    nested_absmax, nested_code, nested_blocksize, nested_offset = nested
    offset = nested_offset.to(device=absmax.device, dtype=torch.float32).reshape(1)
    return (nested_absmax.reshape(-1).contiguous(), nested_code.contiguous(), offset, int(nested_blocksize), True)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int,
                    dtype: torch.dtype, nested: tuple | None = None) -> torch.Tensor:
    """The flat ``n`` values in ``dtype`` (float32 products, one rounding): the reference's bits.
    ``nested``: (nested_absmax, nested_code, nested_blocksize, nested_offset) when ``absmax`` holds
    uint8 codes."""
    out = torch.empty((n,), dtype=dtype, device=packed.device)
    if n == 0:
        return out
    block = 1 << 14 if interpreted() else 1024  # bytes per program
    nabs, ncode, noff, nbs, is_nested = _nested_pointers(absmax, nested)
    with device_guard(packed.device):
        _dequantize_4bit_kernel[(triton.cdiv((n + 1) // 2, block),)](
            packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(), nabs, ncode, noff,
            _code_on(quant_type, packed.device), out, n, blocksize, nbs, NESTED=is_nested, BLOCK=block,
            num_warps=4, **_LAUNCH_OPTIONS)
    return out


def _split_k(device: torch.device, tiles: int, k_tiles: int) -> int:
    """Slices of K so that a narrow layer at M <= 16 still fills the GPU; each slice keeps at least
    4 tiles of K."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * sm_count(device) // max(tiles, 1))
    return max(1, min(wanted, k_tiles // 4))


def gemv_blocks(m: int, k: int, blocksize: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_KB, ALIGNED) of the GEMV (a placeholder choice until tuned on a GPU):
    a tile of BLOCK_KB bytes is 2 * BLOCK_KB values; at most one block long when K is a multiple of
    the blocksize, so that each of its rows has one absmax."""
    block_m = 1 if m == 1 else 16
    aligned = k % blocksize == 0
    block_kb = min(blocksize // 2, 128 if m == 1 else 64) if aligned else 32
    block_n = 32 if interpreted() else 64
    return block_m, block_n, block_kb, aligned


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                out_features: int, bias: torch.Tensor | None, nested: tuple | None = None,
                split_k: int | None = None, lora_s: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                lora_scale: float = 0.0) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` in x's dtype for M <= 16 and even K (the caller routes the rest),
    plus ``lora_scale * lora_s @ lora_b^T`` (LoRA's rank-r term, float32) when given."""
    m, k = x.shape
    n = out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    assert m <= GEMV_MAX_ROWS and k % 2 == 0 and k > 0
    x = x.contiguous()
    block_m, block_n, block_kb, aligned = gemv_blocks(m, k, blocksize)
    tiles_n = triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _split_k(x.device, tiles_n, triton.cdiv(k // 2, block_kb))
    ws = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    nabs, ncode, noff, nbs, is_nested = _nested_pointers(absmax, nested)
    has_lora = lora_s is not None
    if has_lora:
        lora_s = lora_s.float().contiguous()
        lora_b = lora_b.float().contiguous()
    with split_launch(x.device):
        counters = split_counters(x.device, tiles_n) if split_k > 1 else out
        _matmul_4bit_kernel[(tiles_n, split_k)](
            x, packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(), nabs, ncode, noff,
            _code_on(quant_type, x.device), bias.reshape(-1).to(x.dtype).contiguous() if bias is not None else x, out, ws,
            counters, lora_s if has_lora else out, lora_b if has_lora else out, float(lora_scale),
            m, n, k, x.stride(0), blocksize, nbs, lora_b.shape[1] if has_lora else 0,
            NESTED=is_nested, ALIGNED=aligned, HAS_BIAS=bias is not None, HAS_LORA=has_lora, USE_DOT=block_m > 1,
            FP32_DOT=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb,
            SPLIT_K=split_k, num_warps=4, num_stages=3, **_LAUNCH_OPTIONS)
    return out
