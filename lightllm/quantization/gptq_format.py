"""Old home of the GPTQ checkpoint format, now :mod:`lightllm.quantization.gptq.format`; this name is
that same module (existing imports and monkeypatches keep working)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lightllm.quantization.gptq.format")
