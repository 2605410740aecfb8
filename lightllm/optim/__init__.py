"""Optimizers with 8-bit block-wise state (bitsandbytes semantics, torch.optim drop-ins)."""

from .optimizers import Adam8bit, AdamW8bit, BlockwiseOptimizer, GlobalOptimManager, Lion8bit, SGD8bit

__all__ = ["Adam8bit", "AdamW8bit", "BlockwiseOptimizer", "GlobalOptimManager", "Lion8bit", "SGD8bit"]
