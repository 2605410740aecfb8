"""Fused bottleneck adapter in Triton: ``y = res + s * (act(z Wd^T + bd) Wu^T + bu)``.

Shapes: z [M, K] (the adapter's input), res [M, N] (what the adapter's output is added to),
Wd [b, K] and Wu [N, b] (b the bottleneck), bd [b], bu [N], s a float32 tensor of one element
(a learned scaling stays on the device). z and res share a float dtype; the adapter's tensors may
be any float dtype (float32 by default). Everything is computed in float32 and y is rounded once,
to res's dtype. Besides y the kernels return the pre-activation a = z Wd^T + bd [M, b] in float32,
which the backward pass needs (h = act(a) is recomputed from it, never stored).

* :func:`adapter_decode` (M <= 16 tokens): one launch. Programs own a bottleneck slice j (BLOCK_B
  units) and a column tile of y: each computes its slice of a over all of K (Wd's slice is read
  once per column tile, from L2 after the first), applies the activation locally (it is
  elementwise, so a slice of h needs only that slice of a) and multiplies by Wu's [column tile,
  slice] block. The partial products of the slices are summed by the last program of each
  column tile in slice order (kernels/_common.py: split reduction, deterministic), which adds bu,
  scales, adds res and stores y. No temporary in global memory but the small partials.
* :func:`adapter_up` (M > 16, and the input gradient): a tiled GEMM over the short bottleneck
  dimension with the activation applied as a's tiles are loaded (prologue) and the bias, scaling
  and residual in the epilogue, so h is never written and y is written once. a itself comes from
  the split-K skinny kernel of kernels/lora.py.
* Backward, in :func:`adapter_backward_act`: from g = dY Wu (skinny kernel) one elementwise pass
  gives da = s g act'(a) and h = act(a); then dz = da Wd (:func:`adapter_up` on Wd^T),
  dWd = da^T z and dWu = s dY^T h (the deterministic split-K weight-gradient kernel of LoRA).

Activations (``ACT``): the ones below, by transformers' ACT2FN names.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (arrive, device_guard, fitting_configs, grouped_tile, interpreted, launch_tiled,
                      shared_memory_limit, split_counters, split_launch, sum_partials)
from .lora import _precisions

DECODE_ROWS = 16

# transformers' ACT2FN name -> the kernels' code
ACTIVATIONS = {
    "linear": 0, "identity": 0,
    "relu": 1,
    "tanh": 2,
    "gelu": 3,  # erf form
    "gelu_new": 4, "gelu_pytorch_tanh": 4, "gelu_fast": 4,  # tanh form
    "silu": 5, "swish": 5,
    "sigmoid": 6,
    "leakyrelu": 7, "leaky_relu": 7,  # slope 0.01 (AdapterHub's "leakyrelu")
}

# Globals a kernel reads must be constexpr (the interpreter would take plain floats; the compiler does not).
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument (no overflow), with the sign put back.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def activation(a, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(a, 0.0)
    elif ACT == 2:
        return _tanh(a)
    elif ACT == 3:
        return 0.5 * a * (1.0 + tl.erf(a * _INV_SQRT_2))
    elif ACT == 4:
        return 0.5 * a * (1.0 + _tanh((a + 0.044715 * a * a * a) * _SQRT_2_OVER_PI))
    elif ACT == 5:
        return a / (1.0 + tl.exp(-a))
    elif ACT == 6:
        return 1.0 / (1.0 + tl.exp(-a))
    elif ACT == 7:
        return tl.where(a > 0, a, 0.01 * a)
    else:
        return a


@triton.jit
def activation_grad(a, ACT: tl.constexpr):
    """d act(a) / d a."""
    if ACT == 1:
        return tl.where(a > 0, 1.0, 0.0)
    elif ACT == 2:
        t = _tanh(a)
        return 1.0 - t * t
    elif ACT == 3:
        return 0.5 * (1.0 + tl.erf(a * _INV_SQRT_2)) + a * _INV_SQRT_2PI * tl.exp(-0.5 * a * a)
    elif ACT == 4:
        t = _tanh((a + 0.044715 * a * a * a) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a * a)
    elif ACT == 5:
        sig = 1.0 / (1.0 + tl.exp(-a))
        return sig * (1.0 + a * (1.0 - sig))
    elif ACT == 6:
        sig = 1.0 / (1.0 + tl.exp(-a))
        return sig * (1.0 - sig)
    elif ACT == 7:
        return tl.where(a > 0, 1.0, 0.01)
    else:
        return tl.full(a.shape, 1.0, tl.float32)


def _block_b(b: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(max(b, 1))))


# ---- decode: the adapter in one launch (M <= 16) ---------------------------------------------

@triton.jit
def _adapter_decode_kernel(
    z_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, scale_ptr, y_ptr, a_ptr, ws_ptr, counter_ptr,
    M, N, K, B, b_splits,
    stride_zm, stride_zk, stride_rm, stride_rn, stride_dj, stride_dk, stride_un, stride_uj,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_B + tl.arange(0, BLOCK_B)
    m_ok = offs_m < M
    n_ok = offs_n < N
    j_ok = offs_j < B

    # This slice of the pre-activation, over the whole of K.
    a = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        z = tl.load(z_ptr + offs_m[:, None].to(tl.int64) * stride_zm + offs_k[None, :].to(tl.int64) * stride_zk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wdt = tl.load(wd_ptr + offs_j[None, :].to(tl.int64) * stride_dj + offs_k[:, None].to(tl.int64) * stride_dk,
                      mask=k_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        a = tl.dot(z, wdt, a, input_precision=PRECISION)
    if HAS_BD:
        a += tl.load(bd_ptr + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if pid_n == 0:
        tl.store(a_ptr + offs_m[:, None] * B + offs_j[None, :], a, mask=m_ok[:, None] & j_ok[None, :])
    h = tl.where(j_ok[None, :], activation(a, ACT), 0.0)  # act(0) need not be 0 (sigmoid)

    # Its part of h Wu^T for this column tile.
    wut = tl.load(wu_ptr + offs_n[None, :].to(tl.int64) * stride_un + offs_j[:, None].to(tl.int64) * stride_uj,
                  mask=j_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    part = tl.dot(h, wut, input_precision=PRECISION)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if b_splits == 1:
        _finish_tile(part, res_ptr, bu_ptr, scale_ptr, y_ptr, offs_m, offs_n, out_mask, N, stride_rm, stride_rn, HAS_BU)
    else:
        ws = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # [splits, M, N] float32
        tl.store(ws + pid_j * M * N, part, mask=out_mask)
        if arrive(counter_ptr + pid_n) == b_splits - 1:
            total = sum_partials(ws, M * N, out_mask, b_splits)
            _finish_tile(total, res_ptr, bu_ptr, scale_ptr, y_ptr, offs_m, offs_n, out_mask, N, stride_rm, stride_rn,
                         HAS_BU)
            tl.store(counter_ptr + pid_n, 0)


@triton.jit
def _finish_tile(total, res_ptr, bu_ptr, scale_ptr, y_ptr, offs_m, offs_n, mask, N, stride_rm, stride_rn,
                 HAS_BU: tl.constexpr):
    """y = res + s * (total + bu) for one [rows, BLOCK_N] tile (y contiguous [M, N])."""
    if HAS_BU:
        total += tl.load(bu_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    s = tl.load(scale_ptr).to(tl.float32)
    res = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :].to(tl.int64) * stride_rn,
                  mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], (res + s * total).to(y_ptr.dtype.element_ty),
             mask=mask)


def _decode_blocks(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_B, BLOCK_K, num_warps). Wide column tiles: Wd's slice is read once per
    column tile (from L2 after the first). Placeholders until tuned on a GPU."""
    if interpreted():
        return 32, 16, 32, 4
    return min(512, max(64, triton.next_power_of_2(n))), 16, 128, 4


def adapter_decode(z, res, wd, bd, wu, bu, scale: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, a) for M <= 16 rows in one launch."""
    m, k = z.shape
    n = res.shape[1]
    b = wd.shape[0]
    if m > DECODE_ROWS:
        raise ValueError(f"adapter_decode: at most {DECODE_ROWS} rows, got {m}")
    y = torch.empty((m, n), dtype=res.dtype, device=res.device)
    a = torch.empty((m, b), dtype=torch.float32, device=res.device)
    if m == 0 or n == 0:
        return y, a
    block_n, block_b, block_k, warps = _decode_blocks(n)
    block_b = _block_b(b, block_b)
    tiles = triton.cdiv(n, block_n)
    b_splits = triton.cdiv(b, block_b)
    ws = torch.empty((b_splits, m, n), dtype=torch.float32, device=res.device) if b_splits > 1 else y
    with split_launch(res.device):
        counters = split_counters(res.device, tiles) if b_splits > 1 else y
        _adapter_decode_kernel[(tiles, b_splits)](
            z, res, wd, bd if bd is not None else wd, wu, bu if bu is not None else wu, scale, y, a, ws, counters,
            m, n, k, b, b_splits,
            z.stride(0), z.stride(1), res.stride(0), res.stride(1), wd.stride(0), wd.stride(1),
            wu.stride(0), wu.stride(1),
            ACT=act, HAS_BD=bd is not None, HAS_BU=bu is not None, PRECISION=_precisions(z.dtype)[2],
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
        )
    return y, a


# ---- the up-projection GEMM with activation prologue and residual epilogue --------------------

@triton.jit
def _adapter_up_kernel(
    a_ptr, w_ptr, bias_ptr, res_ptr, scale_ptr, y_ptr,
    M, N, B, M_BUCKET,
    stride_am, stride_aj, stride_wn, stride_wj, stride_rm, stride_rn, stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = res + s * (act(a) W^T + bias) over a short inner dimension B; tiles grouped along M
    so that consecutive programs share W's tiles in L2. M_BUCKET only keys the autotuner."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_B):
        offs_j = j0 + tl.arange(0, BLOCK_B)
        j_ok = offs_j < B
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_j[None, :] * stride_aj,
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        h = tl.where(j_ok[None, :], activation(a, ACT), 0.0)
        wt = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_j[:, None].to(tl.int64) * stride_wj,
                     mask=j_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(h, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr).to(tl.float32)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :].to(tl.int64) * stride_rn,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


def _up_configs() -> list:
    # The inner dimension is the bottleneck (16..1024): few K steps, so the tile shape is what
    # matters. A small Hopper/Ampere list; tuned per (M bucket, N, B). On a device with less
    # shared memory the configs that do not fit give way to smaller variants (_prune_up_configs).
    shapes = [(128, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 2),
              (128, 128, 32, 8, 3), (64, 256, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": bb, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bb, w, s in shapes]


def _up_shared_bytes(config, w_bytes: int) -> int:
    """An upper estimate of _adapter_up_kernel's shared memory: ``num_stages`` copies of the a
    (float32) and W tiles, h = act(a) as a float32 operand, and W's tile too when it is converted."""
    block_m, block_n, block_b = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_B"))
    tiles = config.num_stages * (block_m * block_b * 4 + block_b * block_n * w_bytes)
    return tiles + block_m * block_b * 4 + (block_b * block_n * 4 if w_bytes < 4 else 0)


@functools.lru_cache(maxsize=16)
def _fitting_up_configs(w_bytes: int, shared_memory: int) -> list:
    """The autotuner's configs for a device with ``shared_memory`` bytes per block."""
    return fitting_configs(_up_configs(), lambda config: _up_shared_bytes(config, w_bytes), shared_memory, "BLOCK_B")


def _prune_up_configs(configs, named_args, **kwargs) -> list:
    # triton.autotune's early_config_prune: no config that does not fit the device is compiled.
    w = named_args["w_ptr"]
    return _fitting_up_configs(w.element_size(), shared_memory_limit(w.device))


_adapter_up_tuned = triton.autotune(configs=_up_configs(), key=["M_BUCKET", "N", "B", "ACT", "HAS_RES"],
                                    prune_configs_by={"early_config_prune": _prune_up_configs})(_adapter_up_kernel)


def adapter_up(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, res: torch.Tensor | None,
               scale: torch.Tensor | None, act: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``res + scale * (act(a) @ w^T + bias)`` -> [M, N] in ``out_dtype``, one rounding; a [M, B]
    (float32 pre-activations), w [N, B] (any strides, any float dtype)."""
    m, nb = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return y
    # The inputs are float32 (a) and, usually, float32 adapters: one TF32 product when y is half
    # precision (its error is below y's own rounding), IEEE float32 for a float32 y.
    precision = "ieee" if out_dtype == torch.float32 else _precisions(out_dtype)[1]
    args = (a, w, bias if bias is not None else w, res if res is not None else y, scale if scale is not None else a, y,
            m, n, nb, triton.next_power_of_2(m),
            a.stride(0), a.stride(1), w.stride(0), w.stride(1),
            res.stride(0) if res is not None else 0, res.stride(1) if res is not None else 0, y.stride(0), y.stride(1))
    flags = dict(ACT=act, HAS_BIAS=bias is not None, HAS_RES=res is not None, HAS_SCALE=scale is not None,
                 PRECISION=precision)
    launch_tiled(_adapter_up_kernel, _adapter_up_tuned, m, n, args, flags,
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_B=16, GROUP_M=4, num_warps=4), a.device)
    return y


# ---- backward: da = s g act'(a), h = act(a) ----------------------------------------------------

@triton.jit
def _act_backward_kernel(g_ptr, a_ptr, scale_ptr, da_ptr, h_ptr, total, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    a = tl.load(a_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    s = tl.load(scale_ptr).to(tl.float32)
    tl.store(da_ptr + offs, s * g * activation_grad(a, ACT), mask=ok)
    tl.store(h_ptr + offs, activation(a, ACT), mask=ok)


def adapter_backward_act(g: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, h) = (s g act'(a), act(a)) for g, a [M, b] float32 contiguous."""
    da = torch.empty_like(a)
    h = torch.empty_like(a)
    total = a.numel()
    if total:
        block = 1024
        with device_guard(a.device):
            _act_backward_kernel[(triton.cdiv(total, block),)](g, a, scale, da, h, total, ACT=act, BLOCK=block)
    return da, h
