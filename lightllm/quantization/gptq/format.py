"""The GPTQ checkpoint format (AutoGPTQ, GPTQModel, transformers), read and written exactly.

Per quantized Linear with K = in_features, N = out_features, G groups:

* ``qweight`` int32 [K * bits / 32, N]: codes packed along K;
* ``qzeros``  int32 [G, N * bits / 32]: zero points packed along N;
* ``scales``  float16 [G, N];  ``g_idx`` int32 [K]: the group of each input column;
* ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``.

Packing, for every bit width: along the packed axis, consecutive values form one little-endian bit
stream, value j at stream bits ``bits * j``, cut into 32-bit words. For 2, 4 and 8 bits a word
holds 32 / bits whole values; for 3 bits 32 values fill 3 words and values 10 and 21 straddle a
word boundary. So the packed axis must be a multiple of 32 / gcd(32, bits) values: 16, 32, 8, 4
for 2, 3, 4, 8 bits.

Zero points: the original format (``checkpoint_format="gptq"``, v1) stores z - 1 and readers add 1
back; ``"gptq_v2"`` stores z. A true zero of 0 cannot be stored in v1 (it would be -1), so packing
one raises instead of corrupting the neighbouring fields as some writers do.
"""

from __future__ import annotations

import math

import torch

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits) -> int:
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits must be one of {GPTQ_BITS}, got {bits!r}")
    return bits


def _check_format(checkpoint_format: str) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be 'gptq' (v1: stored zero = z - 1) or 'gptq_v2', got {checkpoint_format!r}")
    return checkpoint_format


def values_per_chunk(bits: int) -> tuple[int, int]:
    """(values, int32 words) of the smallest run that packs into whole words."""
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def pack_int(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along ``dim`` into int32 words (GPTQ bit order)."""
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"pack_int: values must be an integer tensor, got {values.dtype}")
    chunk_values, chunk_words = values_per_chunk(bits)
    length = values.shape[dim]
    if length % chunk_values:
        raise ValueError(f"pack_int: {bits}-bit packing needs the packed dimension to be a multiple of "
                         f"{chunk_values}, got {length}")
    v = values.movedim(dim, 0).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"pack_int: values must lie in [0, {2**bits - 1}] for {bits} bits, "
                         f"got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(length // chunk_values, chunk_values, *v.shape[1:])
    words = torch.zeros((v.shape[0], chunk_words, *v.shape[2:]), dtype=torch.int64, device=values.device)
    for j in range(chunk_values):
        bit = bits * j
        word, shift = divmod(bit, 32)
        words[:, word] |= (v[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles into the next word (3-bit only)
            words[:, word + 1] |= v[:, j] >> (32 - shift)
    words = words.reshape(-1, *v.shape[2:])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, as int32
    return words.movedim(0, dim).contiguous()


def unpack_int(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int32 words -> int32 codes in [0, 2**bits)."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_int: packed words must be int32, got {words.dtype}")
    chunk_values, chunk_words = values_per_chunk(bits)
    n_words = words.shape[dim]
    if n_words % chunk_words:
        raise ValueError(f"unpack_int: {bits}-bit data needs a multiple of {chunk_words} words along dim {dim}, got {n_words}")
    # int32 throughout (half the temporaries of int64): after an arithmetic shift the low
    # 32 - shift bits are the word's own, so masking them is exact.
    w = words.movedim(dim, 0)
    w = w.reshape(n_words // chunk_words, chunk_words, *w.shape[1:])
    mask = 2**bits - 1
    out = []
    for j in range(chunk_values):
        word, shift = divmod(bits * j, 32)
        if shift + bits > 32:  # straddles into the next word (3-bit only)
            low = (w[:, word] >> shift) & ((1 << (32 - shift)) - 1)
            out.append((low | (w[:, word + 1] << (32 - shift))) & mask)
        else:
            out.append((w[:, word] >> shift) & mask)
    values = torch.stack(out, dim=1).reshape(-1, *w.shape[2:])
    return values.movedim(0, dim).contiguous()


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``k // group_size`` (every column in its own sequential group; -1 = one group)."""
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Pack unpacked GPTQ tensors into checkpoint tensors.

    Args:
        q: integer codes [K, N] in [0, 2**bits).
        zeros: integer zero points [G, N] (the true z, in [0, 2**bits)).
        scales: [G, N] (stored as float16, the format's dtype).
        g_idx: [K], the group of each input column.
        checkpoint_format: "gptq" (v1, stores z - 1) or "gptq_v2" (stores z).

    Returns: ``{"qweight", "qzeros", "scales", "g_idx"}``.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    if q.dim() != 2 or zeros.dim() != 2 or scales.shape != zeros.shape or g_idx.shape != (q.shape[0],):
        raise ValueError(f"pack_gptq: expected q [K, N], zeros and scales [G, N], g_idx [K]; got q {tuple(q.shape)}, "
                         f"zeros {tuple(zeros.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}")
    if zeros.shape[1] != q.shape[1]:
        raise ValueError(f"pack_gptq: zeros have {zeros.shape[1]} columns but q has N = {q.shape[1]}")
    stored = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if stored.numel() and int(stored.min()) == 0:
            raise ValueError("pack_gptq: a zero point of 0 cannot be stored in the v1 'gptq' format (it stores z - 1); "
                             "use checkpoint_format='gptq_v2'")
        stored = stored - 1
    return {
        "qweight": pack_int(q, bits, dim=0),
        "qzeros": pack_int(stored, bits, dim=1),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_gptq`: ``{"q" [K, N], "zeros" [G, N] (true z), "scales", "g_idx"}``.

    v1 zeros are read as every v1 reader does, stored + 1; a v1 tensor written by a tool that
    stored a zero of 0 as -1 therefore reads back as 2**bits (that is what those tools compute).
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    q = unpack_int(qweight, bits, dim=0)
    zeros = unpack_int(qzeros, bits, dim=1)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    if g_idx.shape != (q.shape[0],):
        raise ValueError(f"unpack_gptq: g_idx has shape {tuple(g_idx.shape)}, expected ({q.shape[0]},) for qweight "
                         f"{tuple(qweight.shape)} at {bits} bits")
    if scales.shape != zeros.shape:
        raise ValueError(f"unpack_gptq: scales {tuple(scales.shape)} and unpacked zeros {tuple(zeros.shape)} differ")
    return {"q": q, "zeros": zeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight ``W [N, K] = scales[g, n] * (q[k, n] - z[g, n])``, g = g_idx[k]."""
    t = unpack_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    g = t["g_idx"].long()
    w = t["scales"].float()[g] * (t["q"] - t["zeros"][g]).float()  # [K, N]
    return w.t().to(dtype or scales.dtype).contiguous()


def detect_zero_convention(qzeros: torch.Tensor, bits: int) -> str | None:
    """For symmetric checkpoints: "gptq_v2" if every stored zero is 2**(bits-1), "gptq" (v1) if every
    one is 2**(bits-1) - 1; None when the zeros vary (asymmetric: the data cannot tell)."""
    stored = unpack_int(qzeros, bits, dim=1)
    if stored.numel() == 0:
        return None
    if bool((stored == 2 ** (bits - 1)).all()):
        return "gptq_v2"
    if bool((stored == 2 ** (bits - 1) - 1).all()):
        return "gptq"
    return None


def grid_params(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool,
                zero_min: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantization grid for weights spanning [wmin, wmax] (any matching shapes).

    The range is widened to include 0; symmetric grids are centred, z = 2**bits / 2; an all-zero
    range becomes [-1, 1]. The scale is rounded to float16 first (the checkpoint stores float16 and
    that is what dequantizes), and the zero is computed from the rounded scale. Returns float32
    ``(scale, zero)``, the zero integral, at least ``zero_min`` (1 for asymmetric v1 checkpoints,
    which cannot store a zero of 0).
    """
    maxq = 2**bits - 1
    wmin, wmax = wmin.float().clamp(max=0), wmax.float().clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    flat = (wmax - wmin) == 0
    wmin = torch.where(flat, -torch.ones_like(wmin), wmin)
    wmax = torch.where(flat, torch.ones_like(wmax), wmax)
    scale = ((wmax - wmin) / maxq).to(torch.float16).float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.clamp(torch.round(-wmin / scale), zero_min, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid ``scale * (q - zero)``, q in [0, 2**bits)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


#: values of W quantized at a time by pack_rtn: the float and integer temporaries are a few copies of
#: one slice of rows, not of the whole weight (a model quantized block by block keeps its peak low)
RTN_SLICE_VALUES = 1 << 20


def pack_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True, zero_min: int = 0,
             checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """:func:`pack_gptq` of :func:`quantize_rtn` of a dense weight [N, K], the same tensors bit for
    bit, computed a slice of output rows at a time (every row's groups are its own). Slices are
    multiples of 32 rows, so each one's zero points fill whole int32 words at any width."""
    if weight.dim() != 2:
        raise ValueError(f"pack_rtn: weight must be [out_features, in_features], got {tuple(weight.shape)}")
    n, k = weight.shape
    rows = max(32, RTN_SLICE_VALUES // max(k, 1) // 32 * 32)
    out: dict[str, torch.Tensor] = {}
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        rtn = quantize_rtn(weight[n0:n1], bits, group_size, sym=sym, zero_min=zero_min)
        part = pack_gptq(rtn["q"], rtn["zeros"], rtn["scales"], rtn["g_idx"], bits, checkpoint_format)
        if n1 - n0 == n:
            return part
        if not out:
            out = {"qweight": part["qweight"].new_empty(part["qweight"].shape[0], n),
                   "qzeros": part["qzeros"].new_empty(part["qzeros"].shape[0], n * bits // 32),
                   "scales": part["scales"].new_empty(part["scales"].shape[0], n), "g_idx": part["g_idx"]}
        word0 = n0 * bits // 32
        out["qweight"][:, n0:n1] = part["qweight"]
        out["qzeros"][:, word0:word0 + part["qzeros"].shape[1]] = part["qzeros"]
        out["scales"][:, n0:n1] = part["scales"]
    return out


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                 zero_min: int = 0) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a dense weight [N, K] (the baseline GPTQ improves on).

    Per group of ``group_size`` input columns and per output row, the grid spans [min, max] of the
    weights extended to include 0 (GPTQ's quantizer); symmetric grids are centred with
    z = (2**bits) / 2. Returns unpacked ``{"q" [K, N], "zeros" [G, N], "scales" [G, N], "g_idx" [K]}``.
    """
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn: weight must be [out_features, in_features], got {tuple(weight.shape)}")
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    if size <= 0:
        raise ValueError(f"quantize_rtn: group_size must be positive or -1, got {group_size}")
    g_idx = default_g_idx(k, group_size, weight.device)
    groups = -(-k // size)
    w = torch.nn.functional.pad(weight.float(), (0, groups * size - k)).view(n, groups, size)
    valid = torch.nn.functional.pad(torch.ones(k, device=weight.device), (0, groups * size - k)).view(groups, size).bool()
    wmin = torch.where(valid, w, torch.zeros((), device=w.device)).amin(-1)
    wmax = torch.where(valid, w, torch.zeros((), device=w.device)).amax(-1)
    scale16, zero = grid_params(wmin, wmax, bits, sym, zero_min)  # [N, G]
    q = quantize_to_grid(w, scale16[..., None], zero[..., None], bits)
    q = q.view(n, groups * size)[:, :k]
    return {
        "q": q.t().to(torch.int32).contiguous(),
        "zeros": zero.t().to(torch.int32).contiguous(),
        "scales": scale16.t().to(torch.float16).contiguous(),
        "g_idx": g_idx,
    }
