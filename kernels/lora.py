"""Fused LoRA in Triton: ``y = x W^T + bias + scale * (x A^T) B^T`` and the pieces of its backward.

Shapes: x [M, K], W [N, K] (any strides: GPT-2's Conv1D passes its [K, N] weight transposed),
A [r, K], B [N, r]; adapters in any float dtype (float32 by default, as PEFT keeps them).

* :func:`lora_decode` (M <= 16 tokens): one launch for the whole layer. Programs own a
  [16, BLOCK_N] output tile and one slice of K: they multiply their slice of W, and compute the
  slice's part of S = x A^T (every column tile does so; A's slice comes from L2). The last program
  of a tile to finish sums the partials in slice order, adds ``scale * S B^T`` and the bias and
  stores y in x's dtype (kernels/_common.py: split reduction); the first tile also stores S.
* :func:`skinny_matmul` (``out = scale * X Y^T`` for an output of few columns): S = x A^T in the
  forward pass, and G = dY B, dA = s G^T X, dB = s dY^T S in the backward pass. The long reduction
  dimension is split over programs with the same deterministic reduction.
* :func:`lora_matmul` (M > 16): a tiled tensor-core GEMM whose epilogue adds ``scale * S B^T`` to
  the float32 accumulator before the single rounding, so the output is written once. Also the
  input gradient dX = dY W + s G A (the same kernel on W^T and A^T views).

Precision: S, G and the adapter gradients are accumulated and stored in float32; their float32
operands go through tensor cores as "tf32x3" (three TF32 products, about float32 accuracy). The
epilogue's S B^T uses one TF32 product when the output is half precision (its error, 2^-11 of
the rank-r term, is below the output's own rounding) and IEEE float32 for float32 outputs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (add_rank_r, arrive, device_guard, first_fitting, fitting_configs, grouped_tile, interpreted,
                      launch_tiled, shared_memory_limit, split_counters, split_launch, split_plan, store_s_part,
                      sum_partials)

DECODE_ROWS = 16  # tokens up to which lora_decode serves (one launch)


def _precisions(dtype: torch.dtype) -> tuple[str, str, str]:
    """(main dot, epilogue dot, float32-operand dot) input precisions for an x of ``dtype``."""
    if dtype == torch.float32:
        return "ieee", "ieee", "ieee"
    return "tf32", "tf32", "tf32x3"  # the main dot's operands are half precision: the setting is unused


def _block_r(r: int, cap: int = 64) -> int:
    return min(cap, max(16, triton.next_power_of_2(max(r, 1))))


# ---- skinny products: S = x A^T, G = dY B, dA, dB ----------------------------------------------

@triton.jit
def _skinny_kernel(
    x_ptr, y_ptr, out_ptr, ws_ptr, counter_ptr,
    M, R, K, k_per_split, splits, scale,
    stride_xm, stride_xk, stride_yr, stride_yk, stride_om, stride_or,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, r] = scale * sum_k X[m, k] Y[r, k], both read as float32; K split over programs."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + offs_r[None, :].to(tl.int64) * stride_yr + offs_k[:, None].to(tl.int64) * stride_yk,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, yt, acc, input_precision=PRECISION)
    out_mask = m_ok[:, None] & r_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    if splits == 1:
        tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # workspace [splits, M, R] float32
        ws = ws_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
        tl.store(ws + pid_s * M * R, acc, mask=out_mask)
        tile = pid_m * tl.num_programs(1) + pid_r
        if arrive(counter_ptr + tile) == splits - 1:
            total = sum_partials(ws, M * R, out_mask, splits)
            tl.store(out_ptrs, (total * scale).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter_ptr + tile, 0)


def _skinny_shared_bytes(blocks: tuple[int, int, int, int, int], x_bytes: int, y_bytes: int) -> int:
    """An upper estimate of _skinny_kernel's shared memory: ``num_stages`` copies of the x and y
    tiles, and both as float32 operands when either is converted to float32."""
    block_m, block_r, block_k, _, stages = blocks
    tiles = stages * (block_m * block_k * x_bytes + block_k * block_r * y_bytes)
    return tiles + ((block_m * block_k + block_k * block_r) * 4 if min(x_bytes, y_bytes) < 4 else 0)


@functools.lru_cache(maxsize=256)
def _skinny_blocks(m: int, r: int, x_bytes: int, y_bytes: int, shared_memory: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_K, num_warps, num_stages): the first that fits ``shared_memory``
    bytes, fewer stages then shorter K tiles after the preferred one; placeholders until tuned."""
    block_m, block_r = (64 if m <= 64 else 128), _block_r(r)
    candidates = [(block_m, block_r, 64, 4, 3), (block_m, block_r, 64, 4, 2), (block_m, block_r, 32, 4, 2),
                  (64, block_r, 32, 4, 2)]
    return first_fitting(candidates, lambda blocks: _skinny_shared_bytes(blocks, x_bytes, y_bytes), shared_memory)


def skinny_matmul(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * x @ y^T`` for x [M, K] and y [R, K] with R small (any strides, any float dtypes),
    accumulated in float32 and written to ``out`` ([M, R], any strides and float dtype; default a
    new float32 tensor)."""
    m, k = x.shape
    r = y.shape[0]
    if out is None:
        out = torch.empty((m, r), dtype=torch.float32, device=x.device)
    if m == 0 or r == 0:
        return out
    if k == 0:
        return out.zero_()
    if interpreted():
        block_m, block_r, block_k, warps, stages = 16, _block_r(r), 32, 4, 3
    else:
        block_m, block_r, block_k, warps, stages = _skinny_blocks(m, r, x.element_size(), y.element_size(),
                                                                  shared_memory_limit(x.device))
    tiles_m, tiles_r = triton.cdiv(m, block_m), triton.cdiv(r, block_r)
    splits, k_per_split = split_plan(tiles_m * tiles_r, k, block_k, x.device)
    ws = torch.empty((splits, m, r), dtype=torch.float32, device=x.device) if splits > 1 else out
    with split_launch(x.device):
        counters = split_counters(x.device, tiles_m * tiles_r) if splits > 1 else out
        _skinny_kernel[(tiles_m, tiles_r, splits)](
            x, y, out, ws, counters, m, r, k, k_per_split, splits, float(scale),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            PRECISION=_precisions(x.dtype)[2],
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )
    return out


def lora_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """S = x A^T [M, r] in float32."""
    return skinny_matmul(x, a)


def lora_weight_grad(u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * u^T v`` [P, r] in float32 for u [M, P], v [M, r] (dB = s dY^T S, dA^T = s X^T G)."""
    return skinny_matmul(u.t(), v.t(), scale)


# ---- the fused GEMM (M > 16) -------------------------------------------------------------------

@triton.jit
def _lora_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, FP32_DOT: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x W^T + bias + scale * S B^T; one [BLOCK_M, BLOCK_N] tile per program, grouped along M
    so that consecutive programs share W tiles in L2. M_BUCKET only keys the autotuner."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :].to(tl.int64) * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs + offs_k[:, None].to(tl.int64) * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)
    if HAS_LORA:
        acc = add_rank_r(acc, s_ptr, stride_sm, stride_sr, 0, 1, b_ptr, stride_bn, stride_br, offs_m, offs_n,
                         m_ok, n_ok, R, scale, BLOCK_R, EPI_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _matmul_configs() -> list:
    # A small Hopper/Ampere list (fp16/bf16 GEMMs, fp32 accumulate); tuned per (M bucket, N, K).
    # On a device with less shared memory the configs that do not fit give way to smaller variants
    # (_prune_matmul_configs).
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
              (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _matmul_shared_bytes(config, x_bytes: int, block_r: int) -> int:
    """An upper estimate of _lora_matmul_kernel's shared memory: copies of the x and W tiles,
    ``num_stages`` of them in half precision (sm_90's wgmma keeps one more than sm_8x) and
    ``num_stages - 1`` in float32 (mma.sync everywhere); the epilogue (not pipelined; ``block_r`` 0
    without an adapter) reuses them for its S and B tiles as float32."""
    block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    copies = config.num_stages if x_bytes < 4 else max(1, config.num_stages - 1)
    main = copies * (block_m * block_k + block_k * block_n) * x_bytes
    return max(main, (block_m * block_r + block_r * block_n) * 4)


@functools.lru_cache(maxsize=64)
def _fitting_matmul_configs(x_bytes: int, block_r: int, shared_memory: int) -> list:
    """The autotuner's configs for a device with ``shared_memory`` bytes per block."""
    return fitting_configs(_matmul_configs(), lambda config: _matmul_shared_bytes(config, x_bytes, block_r),
                           shared_memory)


def _prune_matmul_configs(configs, named_args, **kwargs) -> list:
    # triton.autotune's early_config_prune: no config that does not fit the device is compiled.
    x = named_args["x_ptr"]
    block_r = kwargs["BLOCK_R"] if kwargs["HAS_LORA"] else 0
    return _fitting_matmul_configs(x.element_size(), block_r, shared_memory_limit(x.device))


# BLOCK_R keys the tuning too: it changes the shared memory, so what fits.
_lora_matmul_tuned = triton.autotune(configs=_matmul_configs(),
                                     key=["M_BUCKET", "N", "K", "HAS_LORA", "FP32_DOT", "BLOCK_R"],
                                     prune_configs_by={"early_config_prune": _prune_matmul_configs})(
    _lora_matmul_kernel)


def lora_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor | None,
                b: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``x @ w^T + bias + scale * s @ b^T`` -> [M, N] in x's dtype, one rounding (any strides)."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    has_lora = s is not None
    rank = s.shape[1] if has_lora else 0
    _, epi, _ = _precisions(x.dtype)
    args = (x, w, bias if bias is not None else x, s if has_lora else x, b if has_lora else x, y,
            m, n, k, rank, triton.next_power_of_2(m), float(scale),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            s.stride(0) if has_lora else 0, s.stride(1) if has_lora else 0,
            b.stride(0) if has_lora else 0, b.stride(1) if has_lora else 0, y.stride(0), y.stride(1))
    flags = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, FP32_DOT=x.dtype == torch.float32,
                 EPI_PRECISION=epi, BLOCK_R=_block_r(rank))
    launch_tiled(_lora_matmul_kernel, _lora_matmul_tuned, m, n, args, flags,
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4), x.device)
    return y


# ---- decode: the whole layer in one launch (M <= 16) ------------------------------------------

@triton.jit
def _lora_decode_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, s_out_ptr, ws_y_ptr, ws_s_ptr, counter_ptr,
    M, N, K, R, k_per_split, splits, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, FP32_DOT: tl.constexpr, EPI_PRECISION: tl.constexpr,
    S_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptrs + offs_k[None, :].to(tl.int64) * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)

    # Workspaces: y partials [splits, M, N]; S partials [column tiles, splits, M, R].
    ws_y = ws_y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(ws_y + pid_s * M * N, acc, mask=m_ok[:, None] & n_ok[None, :])
    ws_s = ws_s_ptr + (pid_n * splits).to(tl.int64) * M * R
    if HAS_LORA:  # this slice's part of S = x A^T
        store_s_part(x_ptrs, stride_xk, a_ptr, stride_ar, stride_ak, k_lo, k_hi, BLOCK_K, ws_s + pid_s * M * R,
                     offs_m, m_ok, R, BLOCK_M, BLOCK_R, BLOCK_K, S_PRECISION)

    if arrive(counter_ptr + pid_n) == splits - 1:
        total = sum_partials(ws_y, M * N, m_ok[:, None] & n_ok[None, :], splits)
        if HAS_LORA:
            total = add_rank_r(total, ws_s, R, 1, M * R, splits, b_ptr, stride_bn, stride_br, offs_m, offs_n,
                               m_ok, n_ok, R, scale, BLOCK_R, EPI_PRECISION)
            if pid_n == 0:  # S itself, for the caller (the backward pass needs it)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    s_mask = m_ok[:, None] & (offs_r < R)[None, :]
                    s = sum_partials(ws_s + offs_m[:, None] * R + offs_r[None, :], M * R, s_mask, splits)
                    tl.store(s_out_ptr + offs_m[:, None] * R + offs_r[None, :], s, mask=s_mask)
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], total.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        tl.store(counter_ptr + pid_n, 0)


def _decode_shared_bytes(blocks: tuple[int, int, int, int], x_bytes: int, block_r: int, a_bytes: int) -> int:
    """An upper estimate of _lora_decode_kernel's shared memory (its phases reuse one another's):
    ``num_stages`` copies of the x and W tiles; for S (``block_r`` 0 without an adapter) as many
    of the x and A tiles, and both as float32 operands; the epilogue's S and B tiles as float32."""
    block_n, block_k, _, stages = blocks
    main = stages * (16 * block_k + block_k * block_n) * x_bytes
    if not block_r:
        return main
    s_part = stages * (16 * block_k * x_bytes + block_k * block_r * a_bytes) + (16 * block_k + block_k * block_r) * 4
    return max(main, s_part, (16 * block_r + block_r * block_n) * 4)


@functools.lru_cache(maxsize=64)
def _fitting_decode_blocks(x_bytes: int, block_r: int, a_bytes: int, shared_memory: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the first that fits ``shared_memory`` bytes.
    Wide column tiles: every tile reads A's slice, so A's bytes are read N / BLOCK_N times (from
    L2); so shorter K tiles and fewer stages come before narrower tiles. Placeholders until tuned."""
    candidates = [(256, 64, 8, 3), (256, 32, 8, 3), (256, 32, 8, 2), (128, 32, 4, 2)]
    return first_fitting(candidates, lambda blocks: _decode_shared_bytes(blocks, x_bytes, block_r, a_bytes),
                         shared_memory)


def _decode_blocks(x: torch.Tensor, a: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for lora_decode on x's device."""
    if interpreted():
        return 32, 32, 4, 1
    rank = a.shape[0] if a is not None else 0
    return _fitting_decode_blocks(x.element_size(), _block_r(rank) if rank else 0,
                                  a.element_size() if a is not None else 4, shared_memory_limit(x.device))


def lora_decode(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor | None,
                b: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) for M <= 16 rows of x in one launch; S [M, r] float32 (empty without an adapter)."""
    m, k = x.shape
    n = w.shape[0]
    if m > DECODE_ROWS:
        raise ValueError(f"lora_decode: at most {DECODE_ROWS} rows of x, got {m}")
    has_lora = a is not None
    rank = a.shape[0] if has_lora else 0
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, rank), dtype=torch.float32, device=x.device)  # written by the kernel: no memset
    if m == 0 or n == 0:
        if has_lora and m > 0:
            s = skinny_matmul(x, a)
        return y, s
    block_n, block_k, warps, stages = _decode_blocks(x, a)
    tiles = triton.cdiv(n, block_n)
    splits, k_per_split = split_plan(tiles, k, block_k, x.device)
    ws_y = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    ws_s = torch.empty((tiles, splits, m, rank), dtype=torch.float32, device=x.device) if has_lora else ws_y
    main, epi, s_precision = _precisions(x.dtype)
    with split_launch(x.device):
        _lora_decode_kernel[(tiles, splits)](
            x, w, bias if bias is not None else x, a if has_lora else x, b if has_lora else x, y, s, ws_y, ws_s,
            split_counters(x.device, tiles), m, n, k, rank, k_per_split, splits, float(scale),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            a.stride(0) if has_lora else 0, a.stride(1) if has_lora else 0,
            b.stride(0) if has_lora else 0, b.stride(1) if has_lora else 0,
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, FP32_DOT=x.dtype == torch.float32, EPI_PRECISION=epi,
            S_PRECISION=s_precision, BLOCK_R=_block_r(rank), BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages,
        )
    return y, s
