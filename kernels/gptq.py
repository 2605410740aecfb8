"""GPTQ dequant-matmul in Triton: ``out = x @ W^T (+ bias)`` with W read in the GPTQ layout.

W[n, k] = scales[g[k], n] * (q[k, n] - z[g[k], n]); q packed along K in ``qweight``, z along N in
``qzeros`` (see lightllm/quantization/gptq_format.py). Each program owns a [BLOCK_M, BLOCK_N] tile
of the output and walks K: it loads the packed words of a [BLOCK_K, BLOCK_N] weight tile, decodes
them with shifts and masks, applies the group's zero and scale in float32, and feeds tensor cores
(tl.dot) with fp32 accumulation. The group index is loaded once per K row, not per element; for
act-order checkpoints the module permutes K once at load so that a tile's rows share few groups.

Every bit width uses the same decode: along the packed axis the values form one little-endian bit
stream, value j of a run at bit ``BITS * j``; only 3-bit values can straddle two words.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _decode(words_lo, words_hi, shift, BITS: tl.constexpr):
    """Values at bit ``shift`` of the 64-bit pair (words_hi:words_lo), int32 in [0, 2**BITS)."""
    mask = (1 << BITS) - 1
    low = words_lo >> shift  # arithmetic shift: bits above 31 - shift are sign copies
    if BITS == 3:
        straddles = shift > 32 - BITS
        high_bits = 32 - shift  # how many of the value's bits come from the low word
        low_part = low & tl.where(straddles, (1 << high_bits) - 1, mask)
        high_part = tl.where(straddles, words_hi << tl.where(straddles, high_bits, 0), 0)
        return (low_part | high_part) & mask
    else:
        return low & mask


@triton.jit
def _weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k_ok, n_ok, N,
                 BITS: tl.constexpr, CHUNK_VALUES: tl.constexpr, CHUNK_WORDS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """W^T[offs_k, offs_n] in float32: codes, the group's zero and scale, (q - z) * s."""
    tile_ok = k_ok[:, None] & n_ok[None, :]
    q_bit = BITS * (offs_k % CHUNK_VALUES)
    q_word = (offs_k // CHUNK_VALUES) * CHUNK_WORDS + q_bit // 32
    q_shift = q_bit % 32
    w_lo = tl.load(qweight_ptr + q_word[:, None].to(tl.int64) * N + offs_n[None, :], mask=tile_ok, other=0)
    if BITS == 3:
        w_hi = tl.load(qweight_ptr + (q_word[:, None] + 1).to(tl.int64) * N + offs_n[None, :],
                       mask=tile_ok & (q_shift[:, None] > 32 - BITS), other=0)
    else:
        w_hi = w_lo
    q = _decode(w_lo, w_hi, q_shift[:, None], BITS)

    # The group is loaded once per K row; zeros are packed along N in the group's qzeros row.
    group = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
    z_bit = BITS * (offs_n % CHUNK_VALUES)
    z_word = (offs_n // CHUNK_VALUES) * CHUNK_WORDS + z_bit // 32
    z_shift = z_bit % 32
    zrow = qzeros_ptr + group[:, None].to(tl.int64) * (N * BITS // 32)
    z_lo = tl.load(zrow + z_word[None, :], mask=tile_ok, other=0)
    if BITS == 3:
        z_hi = tl.load(zrow + z_word[None, :] + 1, mask=tile_ok & (z_shift[None, :] > 32 - BITS), other=0)
    else:
        z_hi = z_lo
    z = _decode(z_lo, z_hi, z_shift[None, :], BITS) + ZERO_OFFSET
    scale = tl.load(scales_ptr + group[:, None].to(tl.int64) * N + offs_n[None, :], mask=tile_ok, other=0.0)
    return (q - z).to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _gptq_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, lora_s_ptr, lora_b_ptr, out_ptr,
    M, N, K, R, stride_xm, stride_om, lora_scale,
    BITS: tl.constexpr, CHUNK_VALUES: tl.constexpr, CHUNK_WORDS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k_ok, n_ok, N,
                         BITS, CHUNK_VALUES, CHUNK_WORDS, ZERO_OFFSET).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        if FP32_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)

    # The epilogue terms are added once, by the first K slice.
    if HAS_LORA and pid_k == 0:
        # Epilogue: + lora_scale * S[m, :] @ B[n, :]^T, S and B read as float32 (r <= BLOCK_R).
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        s_tile = tl.load(lora_s_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        b_tile = tl.load(lora_b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
        acc += lora_scale * tl.dot(s_tile, b_tile, input_precision="ieee")
    if HAS_BIAS and pid_k == 0:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:  # out_ptr is a zeroed float32 buffer; slices of K add up in it
        tl.atomic_add(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gptq_dequantize_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K,
    BITS: tl.constexpr, CHUNK_VALUES: tl.constexpr, CHUNK_WORDS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out [N, K] = W, one [BLOCK_K, BLOCK_N] tile of W^T per program (written transposed)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N
    w = _weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k_ok, n_ok, N,
                     BITS, CHUNK_VALUES, CHUNK_WORDS, ZERO_OFFSET)
    tile_ok = k_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=tile_ok)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zeros_v1: bool, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (computed in float32, rounded once)."""
    n = qweight.shape[1]
    k = g_idx.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    chunk_values = 32 // math.gcd(32, bits)
    block_k, block_n = (32, 32) if os.environ.get("TRITON_INTERPRET", "") == "1" else (64, 64)
    guard = torch.cuda.device(qweight.device) if qweight.is_cuda else contextlib.nullcontext()
    with guard:
        _gptq_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
            qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(), out, n, k,
            BITS=bits, CHUNK_VALUES=chunk_values, CHUNK_WORDS=chunk_values * bits // 32,
            ZERO_OFFSET=1 if zeros_v1 else 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
    return out


# Rows from which the op layer uses dequantize + cuBLAS instead of the fused kernel (a placeholder
# until measured on a GPU).
DEQUANTIZE_THEN_GEMM_ROWS = 256

_SM_COUNT: dict[int, int] = {}


def _split_k(device: torch.device, tiles: int, k_blocks: int) -> int:
    """Slices of K so that small-M launches still fill the GPU (a 4096-wide layer at M = 1 has
    only 64 output tiles of 64 columns for 132 SMs); each slice keeps at least 4 K blocks."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = -(-2 * _SM_COUNT[index] // tiles)
    return max(1, min(wanted, k_blocks // 4))


def _blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). One config per M bucket; tuned on a GPU later."""
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return 16, 32, 32, 4
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 64, 64, 64, 4
    return 128, 128, 32, 8


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, zeros_v1: bool,
                lora_s: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                lora_scale: float = 0.0, split_k: int | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias + lora_scale * lora_s @ lora_b^T`` -> [M, N] in x's dtype.

    ``split_k``: slices of K reduced with float32 atomics (default: chosen to fill the GPU).
    (The op layer sends large M to :func:`gptq_dequantize` + cuBLAS instead; see
    ``DEQUANTIZE_THEN_GEMM_ROWS``.)
    """
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    chunk_values = 32 // math.gcd(32, bits)
    block_m, block_n, block_k, warps = _blocks(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _split_k(x.device, tiles, triton.cdiv(k, block_k))
    if split_k > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    has_lora = lora_s is not None
    rank = lora_s.shape[1] if has_lora else 0
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _gptq_matmul_kernel[grid](
            x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(),
            bias.contiguous() if bias is not None else x,
            lora_s.contiguous() if has_lora else x, lora_b.contiguous() if has_lora else x, out,
            m, n, k, rank, x.stride(0), out.stride(0), float(lora_scale),
            BITS=bits, CHUNK_VALUES=chunk_values, CHUNK_WORDS=chunk_values * bits // 32,
            ZERO_OFFSET=1 if zeros_v1 else 0, HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32,
            HAS_LORA=has_lora, BLOCK_R=max(16, triton.next_power_of_2(rank)) if has_lora else 16,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps,
        )
    return out if out.dtype == x.dtype else out.to(x.dtype)
