"""Old home of LLM.int8()'s functional API, now :mod:`lightllm.quantization.bnb.int8`; this name is
that same module (existing imports and monkeypatches keep working)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lightllm.quantization.bnb.int8")
