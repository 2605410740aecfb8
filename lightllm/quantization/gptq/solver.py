"""The GPTQ solver for one weight matrix (Frantar et al., "GPTQ", 2022).

Quantizes the columns of W [N, K] one at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X X^T / n).
Two implementations of the same algorithm:

* :func:`gptq_solve_reference`: the plain PyTorch loop over columns (one small kernel launch per
  step on a GPU). Runs anywhere; the CPU path and the test oracle.
* the fused path (``kernels/gptq_solver.py``, Triton): the loop over the columns of a 128-column
  block runs inside one kernel, every program owning a tile of rows (rows are independent within a
  block: only the error feedback couples columns), so a block costs one launch instead of ~5 per
  column. The lazy update of the remaining columns stays a cuBLAS matmul.

Both follow the reference algorithm's semantics: dead inputs (zero Hessian diagonal) get a zero
weight column and H[i, i] = 1; damping adds ``damp_percent * mean(diag(H))`` (retried ten times
larger when Cholesky fails); a group's grid is computed from the weights as they stand at the start
of the 128-column block where the group begins (or all up front with ``static_groups``); with
act-order the columns are processed by decreasing Hessian diagonal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...backends import register, resolve
from .format import GPTQ_BITS, grid_params, quantize_to_grid

logger = logging.getLogger("lightllm")

BLOCK_SIZE = 128


@dataclass
class GPTQResult:
    """Unpacked result, ready for :func:`lightllm.quantization.pack_gptq`.

    ``q`` int32 [K, N] codes in the original column order, ``zeros`` int32 and ``scales`` float16
    [G, N], ``g_idx`` int32 [K], ``error``: the solver's loss sum((w - q)^2 / d^2) / 2, and
    ``damp``: the damping fraction that was finally used.
    """

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    error: float
    damp: float

    def dequantize(self) -> torch.Tensor:
        """The quantized weight [N, K] in float32."""
        g = self.g_idx.long()
        return (self.scales.float()[g] * (self.q - self.zeros[g]).float()).t().contiguous()


class HessianAccumulator:
    """Running H = 2 X X^T / n over the rows of every input seen (float32, on the input's device).

    ``add(x, mask)`` takes activations [..., K]; ``mask`` (same leading shape, e.g. an attention
    mask) keeps padding positions out.
    """

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._warned_mask = False

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator: input has last dimension {x.shape[-1]}, expected {self.in_features}")
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
            if mask.shape == x.shape[:-1]:
                x = x[mask]
            elif mask.numel() == x.shape[:-1].numel():  # tokens flattened by the model ([B*T, K])
                x = x.reshape(-1, self.in_features)[mask.reshape(-1)]
            elif not self._warned_mask:
                # e.g. a mixture-of-experts expert sees only the tokens routed to it: which of those
                # are padding is not known here, so all of them count
                self._warned_mask = True
                logger.warning("HessianAccumulator: input of shape %s does not line up with the attention mask %s; "
                               "padding tokens are counted for this layer", tuple(x.shape), tuple(mask.shape))
        x = x.reshape(-1, self.in_features).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # Running mean: rescale what was accumulated, then add the new rows' share.
        self.hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian.addmm_(x.t(), x)


def _check_args(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp_percent: float) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ: bits must be one of {GPTQ_BITS}, got {bits!r}")
    if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0)):
        raise ValueError(f"GPTQ: group_size must be a positive int or -1, got {group_size!r}")
    if weight.dim() != 2:
        raise ValueError(f"GPTQ: weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian must be [{k}, {k}] for a weight with in_features={k}, got {tuple(hessian.shape)}")
    if not 0 < damp_percent < 1:
        raise ValueError(f"GPTQ: damp_percent must lie in (0, 1), got {damp_percent}")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the Hessian holds NaN or inf (non-finite calibration activations)")


def _prepare(weight, hessian, act_order: bool, damp_percent: float):
    """Dead columns, act-order permutation, damping and the upper Cholesky factor of H^-1."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    damp = damp_percent
    mean_diag = torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0], device=h.device)
    for _ in range(6):
        damped = h.clone()
        damped[idx, idx] += damp * mean_diag
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return w, perm, upper, damp
        logger.warning("GPTQ: Cholesky failed with damp_percent=%g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with damp_percent={damp / 10:g} "
                       "(degenerate calibration data?)")


def _group_of_position(k: int, group_size: int, perm, static_groups: bool, device) -> torch.Tensor:
    """Group of each processed position (in the order the solver visits the columns)."""
    pos = torch.arange(k, device=device)
    if group_size == -1:
        return torch.zeros(k, dtype=torch.long, device=device)
    if static_groups and perm is not None:
        return perm // group_size  # groups of the original columns
    return pos // group_size


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
               act_order: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
               fused: bool | None = None, zero_min: int = 0) -> GPTQResult:
    """Quantize ``weight`` [N, K] with GPTQ given the input Hessian [K, K].

    ``fused``: True runs the per-block loop in the Triton kernel (a CUDA tensor, or the Triton
    interpreter), False the plain PyTorch loop, None lets the backend choice decide, as for every op
    (op ``gptq_solve_block``: ``lightllm.use_backend`` / ``set_backend`` / ``LIGHTLLM_BACKEND``, else
    the automatic default, which on a GPU is the kernel only once it is in ``GPU_VERIFIED``). Both
    give the same algorithm; results agree up to float rounding order.
    ``zero_min``: smallest zero point of asymmetric grids (1 when writing v1 checkpoints).
    """
    _check_args(weight, hessian, bits, group_size, damp_percent)
    if fused is None:
        solve_block = resolve(SOLVE_BLOCK, weight.device)[1]
    elif fused:
        if _triton_solver() is None:
            raise RuntimeError("gptq_solve(fused=True) needs Triton, which is not installed")
        solve_block = _solve_block_triton
    else:
        solve_block = _solve_block_torch
    n, k = weight.shape
    # Group size -1: one grid per row, from the weights before dead inputs are zeroed (as the
    # reference implementation computes it).
    whole_row = grid_params(weight.detach().float().amin(1), weight.detach().float().amax(1), bits, sym, zero_min) \
        if group_size == -1 else None
    w, perm, hinv, damp = _prepare(weight, hessian, act_order, damp_percent)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    col_group = _group_of_position(k, group_size, perm, static_groups, w.device)
    scales = torch.zeros(groups, n, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(groups, n, dtype=torch.float32, device=w.device)

    def set_group(g: int, cols: torch.Tensor) -> None:
        s, z = grid_params(cols.amin(1), cols.amax(1), bits, sym, zero_min)
        scales[g], zeros[g] = s, z

    if group_size == -1:
        scales[0], zeros[0] = whole_row
    elif static_groups:
        original = w if perm is None else w[:, torch.argsort(perm)]
        for g in range(groups):
            set_group(g, original[:, g * size:(g + 1) * size])

    q = torch.zeros(k, n, dtype=torch.float32, device=w.device)  # codes, in processing order
    loss = torch.zeros((), dtype=torch.float32, device=w.device)
    dynamic_groups = group_size != -1 and not static_groups
    for i1 in range(0, k, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, k)
        if dynamic_groups:  # groups starting in this block, from the weights as they stand now
            for start in range(i1 + (-i1) % size, i2, size):
                set_group(start // size, w[:, start:start + size])
        g = col_group[i1:i2]
        codes, err, block_loss = solve_block(w[:, i1:i2], hinv[i1:i2, i1:i2], scales[g], zeros[g], bits)
        q[i1:i2] = codes
        loss += block_loss
        w[:, i2:] -= err.t() @ hinv[i1:i2, i2:]  # lazy batch update of the columns still to come

    if perm is not None:
        inverse = torch.argsort(perm)
        q = q[inverse]
        g_idx = col_group[inverse] if not static_groups else torch.arange(k, device=w.device) // size
    else:
        g_idx = col_group
    if group_size == -1:
        g_idx = torch.zeros(k, dtype=torch.long, device=w.device)
    return GPTQResult(q=q.to(torch.int32), zeros=zeros.to(torch.int32), scales=scales.to(torch.float16),
                      g_idx=g_idx.to(torch.int32), error=float(loss) / 2, damp=damp)


def _solve_block_reference(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """One block, column by column. ``w`` [N, B] (modified), ``hinv`` [B, B] upper triangular,
    ``scale``/``zero`` [B, N] per column. Returns codes [B, N], scaled errors [B, N], loss."""
    count = w.shape[1]
    codes = torch.empty(count, w.shape[0], dtype=torch.float32, device=w.device)
    errs = torch.empty_like(codes)
    loss = torch.zeros((), dtype=torch.float32, device=w.device)
    for i in range(count):
        col, d = w[:, i], hinv[i, i]
        code = quantize_to_grid(col, scale[i], zero[i], bits)
        dq = scale[i] * (code - zero[i])
        err = (col - dq) / d
        loss += (err * err).sum()
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        codes[i], errs[i] = code, err
    return codes, errs, loss


def gptq_solve_reference(weight, hessian, bits, group_size=128, sym=True, act_order=False, static_groups=False,
                         damp_percent=0.01) -> GPTQResult:
    """The plain PyTorch solver (the oracle for the fused kernel)."""
    return gptq_solve(weight, hessian, bits, group_size, sym, act_order, static_groups, damp_percent, fused=False)


def _triton_solver():
    try:
        import triton  # noqa: F401
    except ImportError:  # no Triton: the plain loop only
        return None
    from ...kernels import gptq_solver

    return gptq_solver


# The block solver is an op like the others, so the same backend choice and GPU verification apply.
SOLVE_BLOCK = "gptq_solve_block"


@register(SOLVE_BLOCK, "torch", ("cpu", "cuda"))
def _solve_block_torch(w, hinv, scale, zero, bits):
    return _solve_block_reference(w.clone(), hinv, scale, zero, bits)


@register(SOLVE_BLOCK, "triton", ("cuda", "cpu"))
def _solve_block_triton(w, hinv, scale, zero, bits):
    return _triton_solver().gptq_block(w, hinv, scale, zero, bits)
