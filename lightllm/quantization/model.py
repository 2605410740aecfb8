"""Old home of GPTQ's calibrated walk and quantize_model, now
:mod:`lightllm.quantization.gptq.calibrated`; this name is that same module (existing imports and
monkeypatches keep working)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lightllm.quantization.gptq.calibrated")
