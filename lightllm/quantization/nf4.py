"""Old home of bitsandbytes' 4-bit NF4/FP4 quantization, now :mod:`lightllm.quantization.bnb.nf4`; this
name is that same module (existing imports and monkeypatches keep working)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("lightllm.quantization.bnb.nf4")
