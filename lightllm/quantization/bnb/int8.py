"""LLM.int8() (Dettmers et al. 2022) in bitsandbytes' functional form: per-row int8 quantization
with absmax statistics, the int8 matmul, its dequantization, and the mixed matmul that keeps
outlier activation columns in 16 bits. Names, arguments and results are bitsandbytes 0.50's:

* ``int8_vectorwise_quant(A, threshold)``: per row ``stats = max|A_row|`` (float32) and
  ``round(A * 127 / stats)`` as int8, computed in float32 from A's values; with ``threshold > 0``
  the columns holding any ``|A| >= threshold`` are returned as ``outlier_cols``, left out of the
  row absmax and zeroed in the codes. An all-zero row gets codes 0 (bitsandbytes divides by zero).
* ``int8_vectorwise_dequant(A, stats) = A * stats / 127`` (times the float32 reciprocal of 127).
* ``int8_linear_matmul(A, B) = A @ B^T`` exactly, in int32.
* ``int8_mm_dequant(C, row_stats, col_stats) = C * (row * col) / 127^2`` (+ bias), float16 unless
  ``dtype`` says otherwise.
* ``int8_mixed_scaled_mm``: the int8 product plus ``A[:, outliers] @ dequant(CB[:, outliers])^T`` in
  A's dtype: the outlier columns multiply the *dequantized int8* weight, as bitsandbytes does.
"""

from __future__ import annotations

import torch

INV_127 = 7.874015718698502e-3  # float32(1 / 127): bitsandbytes multiplies by it
INV_127_SQUARED = 6.200124e-05  # float32(1 / 127**2)


def _rows(A: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or A.dim() < 1:
        raise ValueError(f"{name} must be a tensor of at least one dimension")
    return A.reshape(-1, A.shape[-1])


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """(CA int8 like A, row_stats float32 [rows], outlier_cols int64 or None)."""
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int8_vectorwise_quant takes float16, bfloat16 or float32, got {A.dtype}")
    rows = _rows(A, "A")
    outlier_cols = None
    if threshold > 0.0:
        outliers = rows.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)  # host sync: the reference may
        rows = rows.masked_fill(outliers, 0)
    stats = rows.abs().amax(dim=1).float()
    scale = 127.0 / stats.unsqueeze(1)
    codes = torch.round(rows * scale.masked_fill(stats.unsqueeze(1) == 0, 0)).to(torch.int8)
    if outlier_cols is not None and rows.shape[0] > 1:
        codes[:, outlier_cols] = 0
    return codes.view(A.shape), stats, outlier_cols


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """float32 ``A * stats / 127`` per row."""
    if A.dtype != torch.int8:
        raise ValueError(f"int8_vectorwise_dequant takes int8 codes, got {A.dtype}")
    return A * stats.float().view(-1, 1) * INV_127


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``A @ B^T`` of int8 tensors, exact, in int32."""
    if A.dtype != torch.int8 or B.dtype != torch.int8:
        raise ValueError(f"int8_linear_matmul takes int8 tensors, got {A.dtype} and {B.dtype}")
    if dtype != torch.int32:
        raise ValueError(f"int8_linear_matmul returns int32, not {dtype}")
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"int8_linear_matmul: A has {A.shape[-1]} columns, B {B.shape[-1]}")
    a = _rows(A, "A")
    # float64 holds every partial sum exactly (|sum| < K * 127^2 < 2^53)
    result = (a.double() @ B.double().t()).to(torch.int32).view(*A.shape[:-1], B.shape[0])
    if out is not None:
        return out.copy_(result)
    return result


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, out: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The int32 product scaled back: ``A * (row * col) / 127^2 (+ bias)`` in ``dtype`` (float16)."""
    if A.dtype != torch.int32:
        raise ValueError(f"int8_mm_dequant takes the int32 product, got {A.dtype}")
    if row_stats.dtype != torch.float32 or col_stats.dtype != torch.float32:
        raise ValueError("int8_mm_dequant: row_stats and col_stats must be float32")
    c = A.reshape(-1, A.shape[-1])
    result = c * (row_stats.reshape(-1, 1) * col_stats.reshape(1, -1)) * INV_127_SQUARED
    if bias is not None:
        result = result + bias
    result = result.to(dtype or torch.float16)
    if out is not None:
        return out.copy_(result)
    return result


def int8_scaled_mm(CA, CB, SCA, SCB, bias=None, dtype=None) -> torch.Tensor:
    return int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias=bias, dtype=dtype)


def int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """(output in A's dtype, the outlier columns of A): the int8 product plus the outlier columns of
    A times the dequantized int8 weight's same columns."""
    output = int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if outlier_cols is None or outlier_cols.numel() == 0:
        return output, A.new_empty(0)
    sub_a = A[:, outlier_cols].contiguous()
    sub_b = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype).t()
    return output.addmm(sub_a, sub_b), sub_a
