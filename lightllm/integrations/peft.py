"""peft's own ``get_peft_model`` on lightllm's quantized layers, with lightllm's fused kernels.

A model quantized by lightllm (``lightllm.quantization.quantize_``) holds :class:`lightllm.nn.QuantLinear`
(GPTQ / RTN), :class:`lightllm.nn.Linear4bit` (NF4 / FP4) or :class:`lightllm.nn.Linear8bitLt`
layers, which peft does not know. One call on the user's ``peft.LoraConfig`` registers them through
peft's custom-module dispatch (``LoraConfig._register_custom_module``; nothing in peft is patched)::

    import peft
    from lightllm.integrations.peft import register_lightllm_layers

    config = register_lightllm_layers(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(quantized_model, config)   # trains with lightllm's fused LoRA ops

(peft's ``target_modules="all-linear"`` collects nn.Linear and Conv1D layers only, so it does not
see lightllm's quantized layers: pass the model, ``register_lightllm_layers(config, model)``, and
"all-linear" is expanded here to every linear and lightllm layer but the output head.)

Each targeted lightllm layer is then wrapped in :class:`LightllmLoraLinear`, a subclass of peft's
``LoraLayer`` with peft's module layout (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``,
``lora_dropout.<name>``): peft's ``save_pretrained`` / ``PeftModel.from_pretrained``, adapter
switching, ``disable_adapter`` and ``merge_and_unload`` work as on peft's own layers, and the files are
the ones lightllm's ``lightllm.tuning.get_peft_model`` reads and writes. Its forward is lightllm's
(``lightllm.tuning.lora.layer.fused_lora_forward``): on a QuantLinear with one active adapter the
rank-r term runs in the dequant-matmul's epilogue (``lightllm::gptq_matmul`` with ``lora_a`` in
inference, ``lightllm::gptq_lora_linear`` with its fused backward in training); dropout while
training, autocast and several active adapters take the plain path, base(x) + scaling * B A x.
Adapters are kept in float32 (peft would cast them to a 4-bit layer's compute dtype).

The registration is not stored in ``adapter_config.json`` (peft does not save it): to load a saved
adapter with peft, register on the loaded config and pass it::

    config = register_lightllm_layers(peft.LoraConfig.from_pretrained(adapter_dir))
    model = peft.PeftModel.from_pretrained(quantized_model, adapter_dir, config=config)

Merging (``merge_adapter``, ``merge_and_unload``) into a quantized layer quantizes the merged weight
again (round-to-nearest on the layer's own grid, as ``lightllm.tuning``'s
``merge_and_unload(requantize=True)``): lossy, and peft's API has no flag to refuse it, so it warns.
LoRA variants (DoRA, QA-LoRA, ...), ``lora_bias`` and initializations that read a dense weight
(PiSSA, OLoRA, LoftQ, ...) are refused.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LightllmLoraLinear", "custom_module_mapping", "register_lightllm_layers"]


def _require_peft():
    try:
        import peft
    except ImportError as exc:  # an optional dependency
        raise ImportError("lightllm.integrations.peft needs peft: pip install peft") from exc
    return peft


def custom_module_mapping() -> dict[type, type]:
    """{lightllm layer class: LoRA layer class for peft}: the mapping peft's
    ``LoraConfig._register_custom_module`` takes (QuantLinear, Linear4bit, Linear8bitLt)."""
    _require_peft()
    from ..nn import Linear4bit, Linear8bitLt, QuantLinear
    from ._peft_layer import LightllmLoraLinear

    return {QuantLinear: LightllmLoraLinear, Linear4bit: LightllmLoraLinear, Linear8bitLt: LightllmLoraLinear}


def register_lightllm_layers(config: Any, model: Any = None) -> Any:
    """Register lightllm's quantized layers with peft's LoRA on ``config`` (a ``peft.LoraConfig``)
    and return it, so that ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` with this config
    wrap them in :class:`LightllmLoraLinear` (lightllm's fused forward and backward).

    With ``model`` given, ``target_modules="all-linear"`` is replaced by the names of the model's
    nn.Linear and lightllm layers except its output head (what peft's "all-linear" means, with
    lightllm's layers counted as linear)."""
    peft = _require_peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"register_lightllm_layers takes a peft.LoraConfig, got {type(config).__name__}")
    mapping = custom_module_mapping()
    config._register_custom_module(mapping)
    targets = config.target_modules
    if model is not None and isinstance(targets, str) and targets.lower() == "all-linear":
        config.target_modules = _all_linear_names(model, tuple(mapping))
    return config


def _all_linear_names(model, lightllm_types: tuple[type, ...]) -> set[str]:
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if head is not None and m is head}
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name and isinstance(m, (nn.Linear, *lightllm_types))}
    names -= head_names
    if not names:
        raise ValueError("register_lightllm_layers: target_modules='all-linear' finds no linear layer in the model")
    return names


def __getattr__(name):
    if name == "LightllmLoraLinear":  # the class subclasses peft's LoraLayer: defined on first use
        _require_peft()
        from ._peft_layer import LightllmLoraLinear

        return LightllmLoraLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
