"""bitsandbytes' formats: NF4 / FP4 (``Linear4bit``, QLoRA's base) and LLM.int8 (``Linear8bitLt``),
their functional quantizers (:mod:`.nf4`, :mod:`.int8`) and the config transformers writes."""

from .config import (QUANT_STATE_KEYS, BnbConfig, FP4Config, Int8Config, NF4Config, install_bnb_layers,
                     keeps_its_dtype, quantize_model_bnb)

__all__ = ["QUANT_STATE_KEYS", "BnbConfig", "FP4Config", "Int8Config", "NF4Config", "install_bnb_layers",
           "keeps_its_dtype", "quantize_model_bnb"]
