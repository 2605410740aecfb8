"""GPTQ's inner loop in one Triton kernel: quantize the columns of one 128-column block.

Within a block the only coupling is between columns (each column's error updates the columns to
its right); rows are independent. So each program owns BLOCK_N rows of the block, keeps them in
registers as a [BLOCK_N, BLOCK_K] tile, and runs the whole column loop:

    for i in block:  q_i = grid(w_i);  e_i = (w_i - dq_i) / Hinv[i, i];  w[:, i:] -= e_i Hinv[i, i:]

Per-column grid parameters (scale, zero) come in precomputed ([B, N], coalesced across rows); the
codes and the scaled errors leave as [B, N] rows, which the caller multiplies into the rest of the
matrix with one matmul (the lazy batch update). The plain loop launches ~5 kernels per column;
this launches one per block.

Rounding matches torch: IEEE division (div_rn) and round-half-to-even written out, so codes agree
with the PyTorch solver except where float summation order tips a value across a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _gptq_block_kernel(w_ptr, stride_wn, stride_wk, hinv_ptr, stride_h, scale_ptr, zero_ptr, codes_ptr, err_ptr,
                       loss_ptr, N, count, MAXQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < count
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, count):
        is_col = cols == i
        col = tl.sum(tl.where(is_col[None, :], w, 0.0), axis=1)       # w[:, i] from registers
        scale = tl.load(scale_ptr + i * N + rows, mask=row_ok, other=1.0)
        zero = tl.load(zero_ptr + i * N + rows, mask=row_ok, other=0.0)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(col, scale)) + zero, 0.0), MAXQ)
        h_row = tl.load(hinv_ptr + i * stride_h + cols, mask=col_ok & (cols >= i), other=0.0)
        d = tl.sum(tl.where(is_col, h_row, 0.0), axis=0)
        err = tl.math.div_rn(col - scale * (code - zero), d)
        loss += err * err
        w -= err[:, None] * h_row[None, :]
        tl.store(codes_ptr + i * N + rows, code, mask=row_ok)
        tl.store(err_ptr + i * N + rows, err, mask=row_ok)
    tl.store(loss_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N), loss, mask=row_ok)


def gptq_block(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Quantize one block. ``w`` [N, B] float32 (any strides; not modified), ``hinv`` [B, B] the
    block of the upper Cholesky factor of H^-1, ``scale``/``zero`` [B, N] per column.
    Returns ``(codes [B, N], errors [B, N], loss)`` in float32, as the PyTorch block solver."""
    n, count = w.shape
    if count > 128:
        raise ValueError(f"gptq_block: at most 128 columns per block, got {count}")
    if hinv.shape != (count, count) or scale.shape != (count, n) or zero.shape != (count, n):
        raise ValueError(f"gptq_block: expected hinv [{count}, {count}] and scale/zero [{count}, {n}], got "
                         f"{tuple(hinv.shape)}, {tuple(scale.shape)}, {tuple(zero.shape)}")
    hinv = hinv.contiguous()
    scale, zero = scale.float().contiguous(), zero.float().contiguous()
    codes = torch.empty(count, n, dtype=torch.float32, device=w.device)
    errs = torch.empty_like(codes)
    block_n = 16
    loss = torch.empty(triton.cdiv(n, block_n) * block_n, dtype=torch.float32, device=w.device)
    _gptq_block_kernel[(triton.cdiv(n, block_n),)](
        w, w.stride(0), w.stride(1), hinv, hinv.stride(0), scale, zero, codes, errs, loss, n, count,
        MAXQ=float(2**bits - 1), BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(max(count, 16)), num_warps=4)
    return codes, errs, loss[:n].sum()
