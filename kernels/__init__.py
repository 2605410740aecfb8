"""Triton kernels of lightllm, installed as ``lightllm.kernels``.

They know nothing of models: each module takes tensors and launches kernels. Imports inside this
package are relative, because the folder is ``kernels/`` in the source tree and
``lightllm/kernels/`` once installed.
"""

if __name__ == "lightllm.kernels":
    from .blockwise import dequantize_blockwise, quantize_blockwise

    __all__ = ["quantize_blockwise", "dequantize_blockwise"]
# Otherwise this folder was found as a top-level `kernels` (the source tree is on sys.path): the
# name of Hugging Face's kernel loader, which transformers and bitsandbytes probe for. Stay an
# empty module without a __version__: transformers then judges it "not a usable kernels
# package" and bitsandbytes' `from kernels import get_kernel` fails inside its own try. Raising
# here instead breaks `import transformers` itself (it imports the probe's hit when it finds no
# package metadata).
