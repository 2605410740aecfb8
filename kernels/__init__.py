"""Triton kernels of lightllm, installed as ``lightllm.kernels``.

They know nothing of models: each module takes tensors and launches kernels. Imports inside this
package are relative, because the folder is ``kernels/`` in the source tree and
``lightllm/kernels/`` once installed.
"""

if __name__ != "lightllm.kernels":
    # Run from the source tree, this folder is importable as a top-level `kernels`, the name of
    # Hugging Face's kernel loader that bitsandbytes and transformers probe for. Refuse to pose as it.
    raise ImportError(f"this folder holds lightllm's Triton kernels; import it as lightllm.kernels, not {__name__}")

from .blockwise import dequantize_blockwise, quantize_blockwise

__all__ = ["quantize_blockwise", "dequantize_blockwise"]
