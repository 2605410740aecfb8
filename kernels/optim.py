"""Fused optimizer step in Triton, one launch for many parameters (semantics: lightllm/ops/optim.py).

A launch covers every parameter of one (dtype, state kind) bucket. Each program updates one
256-value block of one parameter in a single pass: load the gradient, the parameter and the state
(8-bit codes decoded through the map and the block's absmax, or float32 values), update, store the
parameter, then re-encode the state with the block's new absmax. The tensors are reached through
tables of addresses (int64, on the device) and a per-program (tensor, block) map, as torch's
multi-tensor apply does, so a step costs one launch per bucket however many parameters it has.

Nothing here synchronizes with the host: the learning rate, each parameter's step, the GradScaler
flags and the per-parameter "gradient is not finite" flags are read from device memory, so a
training step can be captured in a CUDA graph. Steps are incremented by the caller after the launch
(a program must not see another's increment).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .blockwise import nearest_code

ALGO_ADAM, ALGO_ADAMW, ALGO_LION, ALGO_SGD = 0, 1, 2, 3

#: No FMA contraction: beta*m + (1-beta)*g must round the two products and the sum separately, as the
#: reference and the CUDA kernel (__fmul_rn/__fadd_rn) do, or the backends differ in the last bit on
#: a GPU. (The interpreter never contracts; the test compiles for sm_90 and reads the PTX.)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# Columns of the per-tensor table (int64 [n_tensors, 9], the layout of csrc/optim.h's OptimDeviceTensor).
PARAM, GRAD, STATE1, ABSMAX1, STATE2, ABSMAX2, STEP, NUMEL, ALIGNED = range(9)
ROW = 9


@triton.jit
def _field(table_ptr, t, column: tl.constexpr):
    return tl.load(table_ptr + t * 9 + column)


@triton.jit
def _load_state(table_ptr, STATE_COL: tl.constexpr, ABSMAX_COL: tl.constexpr, t, block, offs, ok, qmap_ptr,
                STATE8: tl.constexpr):
    if STATE8:
        codes = tl.load(_field(table_ptr, t, STATE_COL).to(tl.pointer_type(tl.uint8)) + offs, mask=ok, other=0)
        absmax = tl.load(_field(table_ptr, t, ABSMAX_COL).to(tl.pointer_type(tl.float32)) + block)
        return tl.where(ok, tl.load(qmap_ptr + codes.to(tl.int32)) * absmax, 0.0)  # masked lanes stay 0
    else:
        return tl.load(_field(table_ptr, t, STATE_COL).to(tl.pointer_type(tl.float32)) + offs, mask=ok, other=0.0)


@triton.jit
def _store_state(table_ptr, STATE_COL: tl.constexpr, ABSMAX_COL: tl.constexpr, t, block, offs, ok, value,
                 qmap_ptr, mid_ptr, bucket_ptr,
                 STEPS: tl.constexpr, USE_TABLE: tl.constexpr, KEEP_SIGN: tl.constexpr, STATE8: tl.constexpr):
    if STATE8:
        value = tl.where(ok, value, 0.0)
        absmax = tl.max(tl.abs(value), axis=0)
        safe = tl.where(absmax == 0.0, 1.0, absmax)
        inv = tl.where(absmax == 0.0, 0.0, tl.math.div_rn(1.0, safe))
        code = nearest_code(value * inv, mid_ptr, bucket_ptr, STEPS, USE_TABLE)
        if KEEP_SIGN:  # a negative value keeps a negative code (bitsandbytes' rule for the momentum)
            code = tl.where((value < 0.0) & (tl.load(qmap_ptr + code) >= 0.0), code - 1, code)
        tl.store(_field(table_ptr, t, STATE_COL).to(tl.pointer_type(tl.uint8)) + offs, code.to(tl.uint8), mask=ok)
        tl.store(_field(table_ptr, t, ABSMAX_COL).to(tl.pointer_type(tl.float32)) + block, absmax)
    else:
        tl.store(_field(table_ptr, t, STATE_COL).to(tl.pointer_type(tl.float32)) + offs, value, mask=ok)


@triton.jit
def _optimizer_step_kernel(
    work_tensor_ptr, work_block_ptr, table_ptr, skip_ptr,
    qmap1_ptr, mid1_ptr, bucket1_ptr, qmap2_ptr, mid2_ptr, bucket2_ptr,
    lr_ptr, grad_scale_ptr, found_inf_ptr, weight_decay64_ptr,
    beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay,
    ALGO: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE8: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr, NESTEROV: tl.constexpr,
    STEPS1: tl.constexpr, TABLE1: tl.constexpr, STEPS2: tl.constexpr, TABLE2: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(work_tensor_ptr + pid)
    block = tl.load(work_block_ptr + pid).to(tl.int64)
    skip = tl.load(skip_ptr + t) != 0
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf_ptr) != 0.0)
    if skip:
        return
    n = _field(table_ptr, t, 7)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    step = tl.load(_field(table_ptr, t, 6).to(tl.pointer_type(tl.float32))) + 1.0  # the caller increments it
    lr = tl.load(lr_ptr)

    p_ptr = _field(table_ptr, t, 0).to(tl.pointer_type(PARAM_DTYPE))
    g = tl.load(_field(table_ptr, t, 1).to(tl.pointer_type(GRAD_DTYPE)) + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = _load_state(table_ptr, 2, 3, t, block, offs, ok, qmap1_ptr, STATE8)
    # 1 - lr * wd in float64 from the float64 weight decay, rounded once to float32, as the reference
    # (Python floats) and the CUDA kernel compute it; the L2 term below uses float32 wd, as they do
    decay = (1.0 - lr.to(tl.float64) * tl.load(weight_decay64_ptr)).to(tl.float32)
    if ALGO == 0 or ALGO == 1:  # Adam (L2) / AdamW (decoupled)
        v = _load_state(table_ptr, 4, 5, t, block, offs, ok, qmap2_ptr, STATE8)
        if ALGO == 0:
            g = g + weight_decay * p
        else:
            p = p * decay
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        # 1 - beta^t cancels badly in float32 (beta2 = 0.999 at t = 1 keeps 4 digits): float64.
        step64 = step.to(tl.float64)
        bc1 = 1.0 - tl.exp(step64 * log_beta1)  # float32 * float64 -> float64
        bc2 = 1.0 - tl.exp(step64 * log_beta2)
        step_size = (lr.to(tl.float64) / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        # IEEE sqrt and division (Triton's plain ones are approximate on the GPU), as the reference
        denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.math.div_rn(step_size * m, denom)
        _store_state(table_ptr, 4, 5, t, block, offs, ok, v, qmap2_ptr, mid2_ptr, bucket2_ptr,
                     STEPS2, TABLE2, False, STATE8)
    elif ALGO == 2:  # Lion
        c = beta1 * m + one_minus_beta1 * g
        direction = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
        p = p * decay - lr * direction
        m = beta2 * m + one_minus_beta2 * g
    else:  # SGD with momentum
        g = g + weight_decay * p
        m = tl.where(step == 1.0, g, beta1 * m + g)
        if NESTEROV:
            p = p - lr * (g + beta1 * m)
        else:
            p = p - lr * m
    tl.store(p_ptr + offs, p.to(PARAM_DTYPE), mask=ok)
    _store_state(table_ptr, 2, 3, t, block, offs, ok, m, qmap1_ptr, mid1_ptr, bucket1_ptr,
                 STEPS1, TABLE1, True, STATE8)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
ALGO_IDS = {"adam": ALGO_ADAM, "adamw": ALGO_ADAMW, "lion": ALGO_LION, "sgd": ALGO_SGD}


def optimizer_step(algo, tables, skip, params, grads, state1, qmap1, search1, qmap2, search2, lr, beta1, beta2,
                   eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    """One launch for every tensor in ``tables`` (one parameter dtype, one state kind; see
    lightllm/ops/optim.py's device tables). ``skip``: int32 per tensor, nonzero = leave untouched.
    ``search1``/``search2``: (midpoints + sentinel, bucket starts, steps) of each map. Does not
    increment the steps."""
    table, work_tensor, work_block = tables
    total = work_tensor.numel()
    if total == 0:
        return
    mid1, bucket1, steps1 = search1
    mid2, bucket2, steps2 = search2
    device = params[0].device
    zero = torch.zeros(1, dtype=torch.float32, device=device)
    weight_decay64 = torch.full((1,), float(weight_decay), dtype=torch.float64, device=device)  # a fill: no sync
    _optimizer_step_kernel[(total,)](
        work_tensor, work_block, table, skip,
        qmap1, mid1, bucket1, qmap2, mid2, bucket2,
        lr, grad_scale if grad_scale is not None else zero, found_inf if found_inf is not None else zero,
        weight_decay64,
        float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2),
        math.log(beta1) if beta1 > 0 else -1e30, math.log(beta2) if beta2 > 0 else -1e30, float(eps), float(weight_decay),
        ALGO=ALGO_IDS[algo], PARAM_DTYPE=_TRITON_DTYPES[params[0].dtype], GRAD_DTYPE=_TRITON_DTYPES[grads[0].dtype],
        STATE8=state1[0].dtype == torch.uint8, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        MAXIMIZE=bool(maximize), NESTEROV=bool(nesterov),
        STEPS1=min(steps1, 4), TABLE1=steps1 <= 4, STEPS2=min(steps2, 4), TABLE2=steps2 <= 4, BLOCK=256,
        num_warps=2, **LAUNCH_OPTIONS)

