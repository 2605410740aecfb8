"""GPTQ dequant-matmul in Triton: ``out = x @ W^T (+ bias) (+ LoRA's rank-r term)`` with W read in
the GPTQ layout.

W[n, k] = scales[g[k], n] * (q[k, n] - z[g[k], n]); q packed along K in ``qweight``, z along N in
``qzeros`` (see lightllm/quantization/gptq_format.py). Each program owns a [BLOCK_M, BLOCK_N] tile
of the output and walks K: it loads the packed words of a [BLOCK_K, BLOCK_N] weight tile, decodes
them with shifts and masks, applies the group's zero and scale in float32, and feeds tensor cores
(tl.dot) with fp32 accumulation. The group index is loaded once per K row, not per element; for
act-order checkpoints the module permutes K once at load so that a tile's rows share few groups.

Small M slices K over programs (split reduction, kernels/_common.py): one launch, no memset and
no cast pass. With a LoRA adapter the epilogue adds ``scale * S B^T`` before the one rounding,
S given or, for up to 16 rows, computed in the kernel from A (QLoRA decode in one launch).

Every bit width uses the same decode: along the packed axis the values form one little-endian bit
stream, value j of a run at bit ``BITS * j``; only 3-bit values can straddle two words.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (add_rank_r, arrive, device_guard, first_fitting, interpreted, shared_memory_limit, sm_count,
                      split_counters, split_launch, store_s_part, sum_partials)
from .lora import _block_r, _precisions, lora_shrink


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
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, lora_a_ptr, lora_s_ptr, lora_b_ptr, out_ptr,
    ws_y_ptr, ws_s_ptr, counter_ptr,
    M, N, K, R, stride_xm, stride_om, stride_ar, stride_ak, stride_bn, stride_br, lora_scale,
    BITS: tl.constexpr, CHUNK_VALUES: tl.constexpr, CHUNK_WORDS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, LORA: tl.constexpr, EPI_PRECISION: tl.constexpr,
    S_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """LORA: 0 none; 1 S given ([M, R] float32, contiguous); 2 S = x A^T computed here (one M tile).

    With SPLIT_K slices (or an in-kernel S) the partials go through the split reduction of
    kernels/_common.py: the last program of an output tile adds them up and runs the epilogue.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_mask = m_ok[:, None] & n_ok[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, k_ok, n_ok, N,
                         BITS, CHUNK_VALUES, CHUNK_WORDS, ZERO_OFFSET).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        if FP32_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT_K == 1 and LORA != 2:
        if LORA == 1:
            acc = add_rank_r(acc, lora_s_ptr, R, 1, 0, 1, lora_b_ptr, stride_bn, stride_br, offs_m, offs_n, m_ok, n_ok,
                             R, lora_scale, BLOCK_R, EPI_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_y = ws_y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # [SPLIT_K, M, N]
        tl.store(ws_y + pid_k * M * N, acc, mask=out_mask)
        ws_s = ws_s_ptr + (pid_n * SPLIT_K).to(tl.int64) * M * R  # [column tiles, SPLIT_K, M, R]
        if LORA == 2:  # this program's part of S = x A^T, over its K blocks
            store_s_part(x_ptrs, 1, lora_a_ptr, stride_ar, stride_ak, pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K,
                         ws_s + pid_k * M * R, offs_m, m_ok, R, BLOCK_M, BLOCK_R, BLOCK_K, S_PRECISION)
        tile = pid_m * tl.num_programs(1) + pid_n
        if arrive(counter_ptr + tile) == SPLIT_K - 1:
            total = sum_partials(ws_y, M * N, out_mask, SPLIT_K)
            if LORA == 1:
                total = add_rank_r(total, lora_s_ptr, R, 1, 0, 1, lora_b_ptr, stride_bn, stride_br, offs_m, offs_n,
                                   m_ok, n_ok, R, lora_scale, BLOCK_R, EPI_PRECISION)
            if LORA == 2:
                total = add_rank_r(total, ws_s, R, 1, M * R, SPLIT_K, lora_b_ptr, stride_bn, stride_br, offs_m, offs_n,
                                   m_ok, n_ok, R, lora_scale, BLOCK_R, EPI_PRECISION)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter_ptr + tile, 0)


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
    block_k, block_n = (32, 32) if interpreted() else (64, 64)
    with device_guard(qweight.device):
        _gptq_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
            qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(), out, n, k,
            BITS=bits, CHUNK_VALUES=chunk_values, CHUNK_WORDS=chunk_values * bits // 32,
            ZERO_OFFSET=1 if zeros_v1 else 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
    return out


# Rows from which the op layer uses dequantize + cuBLAS instead of the fused kernel (a placeholder
# until measured on a GPU).
DEQUANTIZE_THEN_GEMM_ROWS = 256


def _split_k(device: torch.device, tiles: int, k_blocks: int) -> int:
    """Slices of K so that small-M launches still fill the GPU (a 4096-wide layer at M = 1 has
    only 64 output tiles of 64 columns for 132 SMs); each slice keeps at least 4 K blocks."""
    if device.type != "cuda":
        return 1
    wanted = -(-2 * sm_count(device) // tiles)
    return max(1, min(wanted, k_blocks // 4))


def _candidates(m: int, in_kernel_lora: bool) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M bucket, preferred first (the first
    is what an H100 runs; tuned on a GPU later), then shorter along K for smaller shared memory.
    With S computed in the kernel every column tile reads A's slice, so the tiles are wider; and
    shorter along K, since the pipeliner buffers the S part's tiles too (at 16 x 256 x 64 a 3-bit
    layer needed 330-363 KB of shared memory, more than an H100 has; 16 x 128 x 32 fits an A100)."""
    if m <= 16:
        if in_kernel_lora:
            return [(16, 128, 32, 4, 3), (16, 64, 32, 4, 3), (16, 64, 16, 4, 3)]
        return [(16, 64, 128, 4, 3), (16, 64, 64, 4, 3), (16, 64, 32, 4, 3)]
    if m <= 64:
        return [(64, 64, 64, 4, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3)]
    return [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)]


def _shared_bytes(blocks: tuple[int, int, int, int, int], bits: int, x_bytes: int, scale_bytes: int, lora: int,
                  block_r: int, adapter_bytes: int) -> int:
    """An upper estimate of _gptq_matmul_kernel's shared memory (its phases reuse one another's).

    Main loop: the x tile, the packed weight and zero words (two of each at 3 bits, where a value
    may straddle two words), the scales and the group indices are buffered; the zeros and scales
    wait on the group indices, which takes a stage, so ``num_stages - 2`` copies; plus the x tile
    and the dequantized tile as dot operands. S part (LORA 2): its x and A tiles, ``num_stages``
    copies, and both as float32 operands. Epilogue (not pipelined): S and B tiles as float32."""
    block_m, block_n, block_k, _, stages = blocks
    words = 2 if bits == 3 else 1
    loop = block_m * block_k * x_bytes + block_k * block_n * (8 * words + scale_bytes) + block_k * 4
    main = max(1, stages - 2) * loop + (block_m * block_k + block_k * block_n) * x_bytes
    s_part = 0
    if lora == 2:
        s_part = (stages * (block_m * block_k * x_bytes + block_k * block_r * adapter_bytes)
                  + (block_m * block_k + block_k * block_r) * 4)
    epilogue = (block_m * block_r + block_r * block_n) * 4 if lora else 0
    return max(main, s_part, epilogue)


@functools.lru_cache(maxsize=1024)
def _blocks(m: int, bits: int, x_bytes: int, scale_bytes: int, lora: int, block_r: int, adapter_bytes: int,
            shared_memory: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows: the first candidate that fits
    ``shared_memory`` bytes (a device's :func:`~._common.shared_memory_limit`)."""
    return first_fitting(_candidates(m, lora == 2),
                         lambda blocks: _shared_bytes(blocks, bits, x_bytes, scale_bytes, lora, block_r, adapter_bytes),
                         shared_memory)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, zeros_v1: bool,
                lora_a: torch.Tensor | None = None, lora_s: torch.Tensor | None = None,
                lora_b: torch.Tensor | None = None, lora_scale: float = 0.0, split_k: int | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias + lora_scale * S @ lora_b^T`` -> [M, N] in x's dtype, one launch.

    S is ``lora_s`` [M, r] (float32) or, given ``lora_a`` [r, K] instead, x A^T computed in the
    kernel (up to 16 rows of x; above, S is computed first by kernels/lora.py). ``split_k``: slices
    of K (default: chosen to fill the GPU), added up by the split reduction. (The op layer sends
    large M to :func:`gptq_dequantize` + a dense GEMM instead; see ``DEQUANTIZE_THEN_GEMM_ROWS``.)
    """
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    if lora_s is None and lora_a is not None and m > 16:
        lora_s = lora_shrink(x, lora_a)
    lora = 2 if lora_s is None and lora_a is not None else 1 if lora_s is not None else 0
    rank = 0 if lora == 0 else (lora_a.shape[0] if lora == 2 else lora_s.shape[1])
    chunk_values = 32 // math.gcd(32, bits)
    block_r = _block_r(rank)
    if interpreted():
        block_m, block_n, block_k, warps, stages = 16, 32, 32, 4, 3
    else:
        adapter_bytes = lora_a.element_size() if lora == 2 else 4  # A's tiles are buffered, B's are not
        block_m, block_n, block_k, warps, stages = _blocks(m, bits, x.element_size(), scales.element_size(), lora,
                                                           block_r, adapter_bytes, shared_memory_limit(x.device))
    tiles_m, tiles_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _split_k(x.device, tiles_m * tiles_n, triton.cdiv(k, block_k))
    reduce = split_k > 1 or lora == 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws_y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if reduce else out
    ws_s = torch.empty((tiles_n, split_k, m, rank), dtype=torch.float32, device=x.device) if lora == 2 else out
    lora_s = lora_s.float().contiguous() if lora == 1 else None
    _, epi, s_precision = _precisions(x.dtype)
    with split_launch(x.device):
        counters = split_counters(x.device, tiles_m * tiles_n) if reduce else out
        _gptq_matmul_kernel[(tiles_m, tiles_n, split_k)](
            x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(),
            bias.contiguous() if bias is not None else x, lora_a if lora == 2 else x,
            lora_s if lora == 1 else x, lora_b if lora else x, out, ws_y, ws_s, counters,
            m, n, k, rank, x.stride(0), out.stride(0),
            lora_a.stride(0) if lora == 2 else 0, lora_a.stride(1) if lora == 2 else 0,
            lora_b.stride(0) if lora else 0, lora_b.stride(1) if lora else 0, float(lora_scale),
            BITS=bits, CHUNK_VALUES=chunk_values, CHUNK_WORDS=chunk_values * bits // 32,
            ZERO_OFFSET=1 if zeros_v1 else 0, HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32,
            LORA=lora, EPI_PRECISION=epi, S_PRECISION=s_precision, BLOCK_R=block_r,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps, num_stages=stages,
        )
    return out
