"""StableEmbedding: the embedding bitsandbytes recommends with 8-bit optimizers.

An nn.Embedding with Xavier-uniform initialization and a LayerNorm on its output, whose weight is
registered for 32-bit optimizer state (the rows of a large vocabulary see rare, spiky gradients
that 8-bit state tracks poorly). The registration follows the weight through ``.to()`` and
``.to_empty()``; a weight replaced otherwise (FSDP2's ``fully_shard``) needs
``GlobalOptimManager.get_instance().override_config(module.weight, "optim_bits", 32)`` again. Same constructor as nn.Embedding, same state-dict keys as
bitsandbytes' StableEmbedding (``weight``, ``norm.weight``, ``norm.bias``).
"""

from __future__ import annotations

import torch
from torch import nn


class StableEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embedding_dim, device=device)
        self._register_32bit_state()

    def _register_32bit_state(self) -> None:
        from ..optim import GlobalOptimManager
        GlobalOptimManager.get_instance().override_config(self.weight, "optim_bits", 32)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .to_empty(), .cuda() may put a new Parameter in place of the weight: register it too.
        result = super()._apply(fn, *args, **kwargs)
        self._register_32bit_state()
        return result

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = super().forward(input)
        # The norm runs in float32 even for half-precision weights (it is what keeps the scale stable).
        return self.norm(emb.float()).to(self.weight.dtype)
