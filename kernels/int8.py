"""LLM.int8() forward in Triton: ``y = x W^T + b`` with W as per-row int8 codes CB and absmax SCB,
bit for bit the reference (lightllm/ops/int8.py) at threshold 0, and with no host synchronization
at any threshold.

Launches, all on the current stream, none reading anything back to the host:

1. ``threshold > 0``: :func:`_outlier_columns_kernel` marks the columns of x holding any
   ``|fp16(x)| >= fp16(threshold)`` (int32 mask [K], zeroed first; a program per column block and
   slice of rows, flags raised with an atomic max, so the same mask whatever the order), and
   :func:`_compact_kernel` (one program) lists them in order: ``idx[0:count]``, count in a
   one-element device tensor. Shapes stay static: the list has room for K columns.
2. :func:`_quantize_rows_kernel`, one program per row: the row absmax of the float16 values below
   the threshold, then ``round_half_even(fp16(x) * (127 / absmax))`` as int8, flagged columns
   zeroed; the reference's codes and float32 stats exactly (torch's ``127.0 / stats`` is an IEEE
   reciprocal times 127, rounded twice; ties to even).
3. The int8 product and its epilogue. :func:`_int8_matmul_kernel` either runs the product itself
   (int8 ``tl.dot`` into int32, exact) or reads the int32 product that ``torch._int_mm`` (cuBLASLt)
   computed, then ``C * (row * col) * (1/127^2) + bias`` in float32 in the reference's order, plus,
   for the ``count`` listed columns (a loop bound read on the device), ``x[:, j] *
   fp(CB[:, j] * SCB / 127)`` accumulated in float32: the reference's 16-bit outlier product, with
   the dequantized weight rounded to x's dtype as it does. One rounding to x's dtype at the end
   (the reference rounds the int8 part first, then adds the outlier part in x's dtype: within a
   rounding of it). Without outliers (threshold 0, or none found) the added term is exactly zero,
   so the bits are the reference's. Launched without FMA contraction so that the scaling rounds
   each step as torch does.
"""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

from ._common import device_guard, lora_term, first_fitting, grouped_tile, interpreted, shared_memory_limit, sm_count

#: No FMA contraction: ``C * s * (1/127^2) + bias`` must round each product and the sum as torch does.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

#: |sum| <= 127 * 127 * K must fit in int32.
MAX_K = 133000

#: From this many rows (and K, N multiples of 8, on CUDA) the int8 product is torch._int_mm's
#: (cuBLASLt; it needs more than 16 rows), below it the Triton kernel's own tl.dot. A placeholder
#: until measured on a GPU (benchmarks/bench_bnb_layers.py times both).
INT_MM_MIN_ROWS = 64


def threshold_as_float16(threshold: float) -> float:
    """The threshold as torch compares it with float16 activations: rounded to float32, then to
    float16 (inf above the float16 range). A host-side number: no device work."""
    with numpy.errstate(over="ignore"):
        return float(numpy.float16(numpy.float32(threshold)))


@triton.jit
def _round_half_even(v):
    """torch.round for |v| < 2**22: ``v - floor(v)`` is exact there, so ties are seen exactly."""
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _outlier_columns_kernel(x_ptr, mask_ptr, M, K, stride_xm, rows_per_split, threshold, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """mask[k] = 1 where any row has |fp16(x[m, k])| >= threshold (a float16 value); the int32 mask
    starts zeroed. Program (i, j) reads column block i of the rows of slice j and raises the flags
    it found with an atomic max: the result does not depend on the order the slices ran in."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    first = tl.program_id(1) * rows_per_split
    end = tl.minimum(first + rows_per_split, M)
    hit = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for m0 in range(first, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = (offs_m < end)[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=ok, other=0.0)
        mag = tl.abs(x.to(tl.float16).to(tl.float32))
        hit = tl.maximum(hit, tl.max(tl.where(ok & (mag >= threshold), 1, 0), axis=0))
    tl.atomic_max(mask_ptr + offs_k, hit, mask=k_ok & (hit != 0))


@triton.jit
def _compact_kernel(mask_ptr, idx_ptr, count_ptr, K, BLOCK: tl.constexpr):
    """idx[0:count] = the flagged columns in increasing order; count_ptr[0] = count. One program."""
    count = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        flag = tl.load(mask_ptr + offs, mask=offs < K, other=0).to(tl.int32)
        pos = count + tl.cumsum(flag, 0) - flag
        tl.store(idx_ptr + pos, offs, mask=flag != 0)
        count += tl.sum(flag, axis=0)
    tl.store(count_ptr, count)


@triton.jit
def _quantize_rows_kernel(x_ptr, mask_ptr, codes_ptr, stats_ptr, K, stride_xm, threshold,
                          THRESHOLD: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row ``program_id``: stats = max |fp16(x)| over the values below the threshold (all values
    without one), codes = round(fp16(x) * ((1 / stats) * 127)) with flagged columns zeroed."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    stat = tl.max(tl.zeros((BLOCK_K,), dtype=tl.float32), axis=0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mag = tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float16).to(tl.float32))
        if THRESHOLD:
            mag = tl.where(mag >= threshold, 0.0, mag)
        stat = tl.maximum(stat, tl.max(mag, axis=0))
    # torch's ``127.0 / stats`` is ``stats.reciprocal() * 127``: two roundings, kept here
    safe = tl.where(stat == 0.0, 1.0, stat)
    scale = tl.where(stat == 0.0, 0.0, tl.math.div_rn(tl.full((BLOCK_K,), 1.0, tl.float32), safe) * 127.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        v = tl.load(x_row + offs, mask=k_ok, other=0.0).to(tl.float16).to(tl.float32) * scale
        code = _round_half_even(v)
        if THRESHOLD:
            code = tl.where(tl.load(mask_ptr + offs, mask=k_ok, other=0) != 0, 0.0, code)
        tl.store(codes_ptr + row.to(tl.int64) * K + offs, code.to(tl.int32).to(tl.int8), mask=k_ok)
    tl.store(stats_ptr + row, stat)


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, row_ptr, col_ptr, bias_ptr, x_ptr, idx_ptr, count_ptr, out_ptr, lora_s_ptr, lora_b_ptr,
    lora_scale, M, N, K, stride_xm, stride_cm, R,
    HAS_BIAS: tl.constexpr, OUTLIERS: tl.constexpr, PRODUCT_GIVEN: tl.constexpr, IEEE_OUTLIERS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] (x's dtype) for the codes ``a`` [M, K] and CB ``b`` [N, K], int8, contiguous; the
    int32 product from ``c`` [M, N] (row stride ``stride_cm``) with PRODUCT_GIVEN. HAS_LORA: plus
    ``lora_scale * S B^T`` (S [M, R], B [N, R], float32), added to the layer's output rounded to x's
    dtype, as the reference adds it: LoRA on the int8 base without a second pass over CB."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PRODUCT_GIVEN:
        acc = tl.load(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], mask=out_mask, other=0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * K
        b_cols = b_ptr + offs_n[None, :].to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # CB^T tile
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    row = tl.load(row_ptr + offs_m, mask=m_ok, other=0.0)
    col = tl.load(col_ptr + offs_n, mask=n_ok, other=0.0)
    # the reference's order: C * (row * col), then * float32(1 / 127^2), then + bias
    y = acc.to(tl.float32) * (row[:, None] * col[None, :]) * 6.200124e-05
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]
    if OUTLIERS:
        count = tl.load(count_ptr)
        extra = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        b_cols = b_ptr + offs_n[None, :].to(tl.int64) * K
        for o0 in range(0, count, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_ok = offs_o < count
            cols = tl.load(idx_ptr + offs_o, mask=o_ok, other=0)
            xo = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & o_ok[None, :], other=0.0)
            q = tl.load(b_cols + cols[:, None], mask=o_ok[:, None] & n_ok[None, :], other=0)
            # int8_vectorwise_dequant: (CB * SCB) * float32(1 / 127), rounded to x's dtype
            w = (q.to(tl.float32) * col[None, :] * 7.874015718698502e-3).to(xo.dtype)
            if IEEE_OUTLIERS:
                extra = tl.dot(xo, w, extra, input_precision="ieee")
            else:
                extra = tl.dot(xo, w, extra)
        y = y + extra
    if HAS_LORA:
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + lora_scale * lora_term(
            lora_s_ptr, lora_b_ptr, offs_m, offs_n, m_ok, n_ok, R, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def _matmul_config(m: int, device: torch.device | None = None) -> dict:
    """Tile sizes by M bucket (GPU; placeholders until tuned on a card). Small M reads the weight
    once with narrow column tiles so that more programs share it; large M uses square tiles. On a
    card with less shared memory than the first choice needs (consumer cards: ~100 KB), fewer
    stages, then shorter K tiles."""
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_O=16, GROUP_M=4, num_warps=4)
    if m <= 16:
        first = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, BLOCK_O=16, GROUP_M=1, num_warps=4, num_stages=4)
    elif m <= 64:
        first = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, BLOCK_O=32, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        first = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, BLOCK_O=32, GROUP_M=8, num_warps=8, num_stages=3)
    if device is None:
        return first
    candidates = [first, {**first, "num_stages": 2}] + [
        {**first, "num_stages": 2, "BLOCK_K": first["BLOCK_K"] >> halved} for halved in (1, 2)]

    def shared_bytes(c):  # int8 A and B tiles per stage, and the float32 tile the epilogue may stage
        return c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] + 4 * c["BLOCK_M"] * c["BLOCK_N"]

    return first_fitting(candidates, shared_bytes, shared_memory_limit(device))


def check_inputs(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The C++ kernel's checks and messages (csrc/bindings_bnb.cpp), as ValueErrors."""
    op = "int8_linear"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        name = {torch.int32: "Int", torch.int64: "Long", torch.float64: "Double"}.get(x.dtype, str(x.dtype))
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16, got {name}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise ValueError(f"{op}: CB must be a 2-D int8 weight [out, in], got {cb.dtype} of shape {list(cb.shape)}")
    n, k = cb.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} features, CB of shape {list(cb.shape)} takes {k}")
    if scb.dtype != torch.float32 or scb.numel() != n:
        raise ValueError(f"{op}: SCB must hold one float32 absmax per output row ({n}), got {scb.dtype} of shape "
                         f"{list(scb.shape)}")
    if k > MAX_K:
        raise ValueError(f"{op}: K = {k} is too large for an exact int32 product (at most {MAX_K})")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"{op}: bias has {bias.numel()} values, the layer has {n} outputs")
    for name, t in (("CB", cb), ("SCB", scb), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def quantize_rows(x2: torch.Tensor, threshold: float):
    """(codes int8 [M, K], stats float32 [M], outlier idx int32 [K] or None, count int32 [1] or None)
    for the rows of ``x2`` [M, K] (unit column stride); no host synchronization."""
    m, k = x2.shape
    dev = x2.device
    codes = torch.empty((m, k), dtype=torch.int8, device=dev)
    stats = torch.empty((m,), dtype=torch.float32, device=dev)
    idx = count = None
    if m == 0:
        return codes, stats, idx, count
    block_k = 64 if interpreted() else 1024
    thr = threshold_as_float16(threshold) if threshold > 0.0 else 0.0
    with device_guard(dev):
        mask = codes  # unused without a threshold
        if threshold > 0.0:
            mask = torch.zeros((k,), dtype=torch.int32, device=dev)
            idx = torch.empty((k,), dtype=torch.int32, device=dev)
            count = torch.empty((1,), dtype=torch.int32, device=dev)
            cols, rows = (64, 16) if interpreted() else (128, 32)
            # slices of rows so that a prefill (thousands of rows, K / 128 column blocks) fills the GPU
            col_blocks = triton.cdiv(k, cols)
            splits = min(triton.cdiv(m, rows), triton.cdiv(2 * sm_count(dev), col_blocks))
            rows_per_split = triton.cdiv(triton.cdiv(m, splits), rows) * rows
            _outlier_columns_kernel[(col_blocks, triton.cdiv(m, rows_per_split))](
                x2, mask, m, k, x2.stride(0), rows_per_split, thr, BLOCK_M=rows, BLOCK_K=cols, num_warps=4)
            _compact_kernel[(1,)](mask, idx, count, k, BLOCK=64 if interpreted() else 1024, num_warps=4)
        _quantize_rows_kernel[(m,)](x2, mask, codes, stats, k, x2.stride(0), thr, THRESHOLD=threshold > 0.0,
                                    BLOCK_K=block_k, num_warps=4, **LAUNCH_OPTIONS)
    return codes, stats, idx, count


def use_int_mm(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether the int8 product is torch._int_mm's: on CUDA, from INT_MM_MIN_ROWS rows, where
    cuBLASLt takes the shape (more than 16 rows, K and N multiples of 8)."""
    return device.type == "cuda" and m >= max(INT_MM_MIN_ROWS, 17) and n % 8 == 0 and k % 8 == 0


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                product: str = "auto", lora_s: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                lora_scale: float = 0.0) -> torch.Tensor:
    """The op ``lightllm::int8_linear`` (see the module docstring). ``product``: "auto", "triton"
    (the kernel's int8 tl.dot) or "int_mm" (torch._int_mm's int32 product, then the same epilogue).
    ``lora_s`` [M, r] and ``lora_b`` [N, r]: LoRA's rank-r term added in the epilogue."""
    check_inputs(x, cb, scb, bias)
    has_lora = lora_s is not None
    if has_lora:
        lora_s = lora_s.float().contiguous()
        lora_b = lora_b.float().contiguous()
    n, k = cb.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    if k == 0:
        out.copy_((bias if bias is not None else out.new_zeros(n)).to(x.dtype).expand(m, n))
        if has_lora:
            out = torch.addmm(out.float(), lora_s, lora_b.t(), alpha=lora_scale).to(x.dtype)
        return out.view(*x.shape[:-1], n)
    codes, stats, idx, count = quantize_rows(x2, threshold)
    cb = cb.contiguous()
    scb = scb.reshape(-1).contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()  # the kernel reads it with unit stride
    if product == "auto":
        product = "int_mm" if use_int_mm(m, n, k, x.device) else "triton"
    c = None
    if product == "int_mm":
        c = torch._int_mm(codes, cb.t())
    elif product != "triton":
        raise ValueError(f"int8_linear: product must be 'auto', 'triton' or 'int_mm', got {product!r}")
    blocks = _matmul_config(m, x.device)
    outliers = idx is not None
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    with device_guard(x.device):
        _int8_matmul_kernel[grid](
            codes, cb, c if c is not None else codes, stats, scb, bias if bias is not None else stats, x2,
            idx if outliers else codes, count if outliers else codes, out, lora_s if has_lora else stats,
            lora_b if has_lora else stats, float(lora_scale),
            m, n, k, x2.stride(0), c.stride(0) if c is not None else 0, lora_b.shape[1] if has_lora else 0,
            HAS_BIAS=bias is not None, OUTLIERS=outliers, PRODUCT_GIVEN=c is not None,
            IEEE_OUTLIERS=x.dtype == torch.float32, HAS_LORA=has_lora, **blocks, **LAUNCH_OPTIONS)
    return out.view(*x.shape[:-1], n)
