"""QuantLinear: a drop-in for nn.Linear holding a GPTQ-format weight (2, 3, 4 or 8 bits).

Its buffers carry the names and layouts of AutoGPTQ / GPTQModel / transformers checkpoints
(``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``), so their state dicts load as they are
and ``state_dict()`` writes the standard format. The weight is frozen; autograd flows to the input.

Act-order checkpoints (``g_idx`` not monotone) are rearranged once, when loaded: the rows of
``qweight`` and ``g_idx`` are permuted so that each group's input columns are contiguous, and the
forward pass gathers the input's columns in the same order. The permuted copy replaces the original
(one copy of the weight on the device); ``state_dict()`` undoes the permutation. Buffers written
in place from outside (``module.qweight.copy_(...)``) are taken to be in the checkpoint layout and
rearranged at the next forward; that check compares version counters on the host, no synchronization.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import gptq as ops_gptq
from ..ops import lora as ops_lora
from ..quantization.gptq import format as gptq_format
from ..quantization.gptq.format import GPTQ_BITS, values_per_chunk

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W stored in the GPTQ format.

    Args:
        in_features, out_features: as nn.Linear (K and N).
        bits: 2, 3, 4 or 8. The packed layouts need K (and N, for the zeros) to be a multiple of
            16, 32, 8 or 4 respectively.
        group_size: input columns per quantization group, or -1 for one group (per channel).
        bias: whether the layer has a bias (float16, as in GPTQ checkpoints).
        checkpoint_format: "gptq" (v1: stored zero = z - 1, what most tools write) or "gptq_v2".
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128, bias: bool = True,
                 checkpoint_format: str = "gptq", device=None):
        super().__init__()
        if bits not in GPTQ_BITS:
            raise ValueError(f"QuantLinear: bits must be one of {GPTQ_BITS}, got {bits!r}")
        if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0)):
            raise ValueError(f"QuantLinear: group_size must be a positive int or -1, got {group_size!r}")
        gptq_format._check_format(checkpoint_format)
        multiple, _ = values_per_chunk(bits)
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size <= 0 or size % multiple:
                raise ValueError(f"QuantLinear: {bits}-bit weights need {name} to be a positive multiple of {multiple} "
                                 f"(the packed layout), got {size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        groups = -(-in_features // (in_features if group_size == -1 else group_size))
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", gptq_format.default_g_idx(in_features, group_size, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        # Act-order: input column order of the kernel layout (None when g_idx is monotone).
        self.register_buffer("_perm", None, persistent=False)
        self._layout_stamp = self._stamp()

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int = 128, sym: bool = True,
                    checkpoint_format: str = "gptq") -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` (the baseline GPTQ improves on)."""
        weight = linear.weight.detach()
        # v1 cannot store a zero of 0: asymmetric grids written as v1 keep z >= 1
        packed = gptq_format.pack_rtn(weight, bits, group_size, sym=sym,
                                      zero_min=1 if checkpoint_format == "gptq" and not sym else 0,
                                      checkpoint_format=checkpoint_format)
        n, k = weight.shape
        return cls._from_packed(packed, k, n, bits, group_size, linear.bias, checkpoint_format)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, group_size: int, bias: torch.Tensor | None = None,
                       checkpoint_format: str = "gptq") -> "QuantLinear":
        """A layer from unpacked codes q [K, N], true zeros and scales [G, N] and g_idx [K] (what
        quantize_rtn and the GPTQ solver return), packed into the checkpoint format."""
        k, n = q.shape
        packed = gptq_format.pack_gptq(q, zeros, scales, g_idx, bits, checkpoint_format)
        return cls._from_packed(packed, k, n, bits, group_size, bias, checkpoint_format)

    @classmethod
    def _from_packed(cls, packed: dict[str, torch.Tensor], k: int, n: int, bits: int, group_size: int,
                     bias: torch.Tensor | None, checkpoint_format: str) -> "QuantLinear":
        module = cls(k, n, bits, group_size, bias=bias is not None, checkpoint_format=checkpoint_format,
                     device=packed["qweight"].device)
        for name, tensor in packed.items():
            getattr(module, name).copy_(tensor)
        if bias is not None:
            module.bias.copy_(bias.detach())
        module._to_kernel_layout()
        return module

    # ---- kernel layout (act-order) ------------------------------------------------------------
    def _stamp(self):
        # Identity and version counter of the two buffers the layout depends on: a host-side read,
        # no synchronization. (Buffers are read from _buffers: nn.Module's __getattr__ is slow.)
        qweight, g_idx = self._buffers["qweight"], self._buffers["g_idx"]
        return id(qweight), qweight._version, id(g_idx), g_idx._version

    @torch.no_grad()
    def _to_kernel_layout(self) -> None:
        """Buffers in checkpoint layout -> kernel layout (groups contiguous along K). Synchronizes."""
        self._perm = None
        g = self.g_idx
        self._check_groups(g, self.scales.shape[0])
        if g.numel() > 1 and not bool((g[1:] >= g[:-1]).all()):
            perm = torch.argsort(g, stable=True)
            q = gptq_format.unpack_int(self.qweight, self.bits, dim=0)
            self.qweight.copy_(gptq_format.pack_int(q[perm], self.bits, dim=0))
            self.g_idx.copy_(g[perm])
            self._perm = perm
        self._layout_stamp = self._stamp()

    def _check_groups(self, g_idx: torch.Tensor, groups: int, prefix: str = "") -> None:
        """g_idx must name existing groups: the kernels index scales and qzeros with it unchecked."""
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"QuantLinear: {prefix}g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())} but scales "
                             f"and qzeros hold {groups} groups (in_features={self.in_features}, group_size={self.group_size})")

    def _checkpoint_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, g_idx) in the checkpoint's column order."""
        if self._perm is None:
            return self.qweight, self.g_idx
        inverse = torch.argsort(self._perm)
        q = gptq_format.unpack_int(self.qweight, self.bits, dim=0)
        return gptq_format.pack_int(q[inverse], self.bits, dim=0), self.g_idx[inverse]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._perm is not None:
            destination[prefix + "qweight"], destination[prefix + "g_idx"] = self._checkpoint_layout()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Refuse a g_idx that points outside the groups before anything is copied in.
        g_idx, scales = state_dict.get(prefix + "g_idx"), state_dict.get(prefix + "scales")
        if g_idx is not None:
            self._check_groups(g_idx, (scales if scales is not None else self.scales).shape[0], prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._to_kernel_layout()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._layout_stamp = self._stamp()  # moved or cast, still in kernel layout
        return result

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] (in the scales' dtype unless ``dtype``)."""
        self._check_layout()
        w = torch.ops.lightllm.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                               self.checkpoint_format == "gptq", dtype or self.scales.dtype)
        return w if self._perm is None else w[:, torch.argsort(self._perm)]

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the round-to-nearest quantization of ``weight`` [out, in]
        (same bits, group size, checkpoint format, and symmetric if the current grid is): what
        merging a LoRA adapter into a quantized layer takes. Groups become sequential (act-order
        ordering is not kept). Lossy: the merged weight is rounded to the grid again."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.requantize_: weight must be [{self.out_features}, {self.in_features}], "
                             f"got {tuple(weight.shape)}")
        v1 = self.checkpoint_format == "gptq"
        zeros = gptq_format.unpack_int(self.qzeros, self.bits, dim=1) + (1 if v1 else 0)
        sym = bool((zeros == 2 ** (self.bits - 1)).all())
        packed = gptq_format.pack_rtn(weight.to(self.qweight.device), self.bits, self.group_size, sym=sym,
                                      zero_min=1 if v1 and not sym else 0, checkpoint_format=self.checkpoint_format)
        for name, tensor in packed.items():
            getattr(self, name).copy_(tensor)
        self._to_kernel_layout()

    def _check_layout(self) -> None:
        # Not while torch.compile traces: version counters are not traceable; a compiled graph
        # takes the layout as it was when it was compiled.
        if not torch.compiler.is_compiling() and self._layout_stamp != self._stamp():
            self._to_kernel_layout()  # buffers written from outside, in checkpoint layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_lora(x)

    def _kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as [tokens, in_features] in the kernel's column order, after the checks."""
        # A decode step runs this once per layer and token: keep the host path short.
        if x.dtype not in _FLOAT_TYPES:
            raise TypeError(f"QuantLinear: input must be float32, float16 or bfloat16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input's last dimension is {x.shape[-1]}, expected in_features = "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        self._check_layout()
        if x.device != self._buffers["qweight"].device:
            raise ValueError(f"QuantLinear: input is on {x.device} but the layer is on {self._buffers['qweight'].device}")
        x2 = x.reshape(-1, self.in_features)
        perm = self._buffers["_perm"]
        return x2 if perm is None else x2.index_select(1, perm)

    def forward_with_lora(self, x: torch.Tensor, lora_a: torch.Tensor | None = None,
                          lora_b: torch.Tensor | None = None, lora_scale: float = 0.0,
                          lora_s: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(x) + lora_scale * S @ lora_b^T`` with S = x lora_a^T (or ``lora_s`` [tokens, r]
        float32 when given), the rank-r term added in the kernel's epilogue; for up to 16 tokens
        S is computed in the same launch. ``lora_a`` [r, in_features], ``lora_b`` [out_features, r].
        Inference only: the adapters get no gradient here (see :meth:`lora_linear`)."""
        x2 = self._kernel_input(x)
        b = self._buffers
        op = "QuantLinear.forward_with_lora"
        if (lora_a is not None or lora_s is not None) != (lora_b is not None):
            raise ValueError(f"{op}: lora_b goes with lora_a or lora_s (the rank-r term needs both factors)")
        if lora_a is not None:
            ops_lora.check_adapter(op, x2, self.out_features, lora_a, lora_b)
            if b["_perm"] is not None:
                lora_a = lora_a.index_select(1, b["_perm"])
        elif lora_s is not None:
            r = lora_b.shape[-1] if lora_b.dim() == 2 else -1
            if (lora_s.dim() != 2 or tuple(lora_s.shape) != (x2.shape[0], r) or tuple(lora_b.shape) != (self.out_features, r)
                    or r < 1 or lora_s.dtype not in _FLOAT_TYPES or lora_b.dtype not in _FLOAT_TYPES
                    or lora_s.device != x2.device or lora_b.device != x2.device):
                raise ValueError(f"{op}: lora_s must be a float [tokens, r] = [{x2.shape[0]}, r] and lora_b a float "
                                 f"[out_features, r] = [{self.out_features}, r] tensor on {x2.device}; got "
                                 f"{lora_s.dtype} {tuple(lora_s.shape)} and {lora_b.dtype} {tuple(lora_b.shape)}")
        y = ops_gptq.gptq_matmul(x2, b["qweight"], b["qzeros"], b["scales"], b["g_idx"], b["bias"],
                                 lora_a, lora_s, lora_b, lora_scale, self.bits, self.checkpoint_format == "gptq")
        return y.reshape(*x.shape[:-1], self.out_features)

    def lora_linear(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    lora_scale: float) -> torch.Tensor:
        """``forward(x) + lora_scale * (x lora_a^T) lora_b^T``, differentiable in x and the adapters
        (QLoRA training: ``lightllm::gptq_lora_linear``; the weight is dequantized only in backward)."""
        x2 = self._kernel_input(x)
        ops_lora.check_adapter("QuantLinear.lora_linear", x2, self.out_features, lora_a, lora_b)
        b = self._buffers
        if b["_perm"] is not None:
            lora_a = lora_a.index_select(1, b["_perm"])
        y, _ = torch.ops.lightllm.gptq_lora_linear(x2, b["qweight"], b["qzeros"], b["scales"], b["g_idx"], b["bias"],
                                                   lora_a, lora_b, lora_scale, self.bits,
                                                   self.checkpoint_format == "gptq")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, checkpoint_format={self.checkpoint_format}")
