"""lightllm: quantized matmul, 8-bit optimizers and parameter-efficient tuning for LLMs.

Layers: kernels (``csrc/`` as lightllm._C and lightllm._C_cuda, ``kernels/`` as lightllm.kernels) -> ops
(``torch.ops.lightllm.*``, lightllm.ops) -> functional API (lightllm.functional) -> modules.

``pip install lightllm`` is the core (torch, numpy, safetensors, tqdm, packaging; triton where torch
brings it). What works with Hugging Face models needs ``pip install "lightllm[hf]"`` (the demo
``lightllm[demo]``); without it those functions raise :class:`MissingDependencyError`, an
ImportError that names the extra.
"""

import logging

from . import ops  # noqa: F401  (registers the custom ops)
from ._extras import MissingDependencyError
from . import functional, nn, optim, quantization, tuning
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

logging.getLogger("lightllm").addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailableError",
    "MissingDependencyError",
    "available_backends",
    "functional",
    "nn",
    "quantization",
    "tuning",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]
