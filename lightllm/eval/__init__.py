"""Evaluation: perplexity (perplexity.py) and task accuracy on math word problems (math.py)."""

from .perplexity import eval_windows, perplexity, tokenize_stream

__all__ = ["eval_windows", "perplexity", "tokenize_stream"]
