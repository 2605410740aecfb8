"""transformers' ``from_pretrained`` with lightllm's quantized layers.

Importing this module registers lightllm with transformers' quantizer registry
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``, under the
method name ``"lightllm"``). Then::

    import lightllm.integrations.transformers  # noqa: F401  (the registration)
    from lightllm.integrations.transformers import LightllmConfig
    from transformers import AutoModelForCausalLM

    # a checkpoint lightllm wrote (save_quantized, the CLI's quantize, or save_pretrained below):
    model = AutoModelForCausalLM.from_pretrained("out/")                    # QuantLinear layers

    # quantize while loading (rtn, nf4, fp4, int8 need no data; gptq takes calibration token ids
    # or the name of a corpus lightllm.data knows, e.g. dataset="shakespeare")
    model = AutoModelForCausalLM.from_pretrained("model/", quantization_config=LightllmConfig(method="rtn", bits=4))
    model.save_pretrained("out/")                                           # loads back the same way

    # a GPTQ checkpoint written by GPTQModel / AutoGPTQ, into lightllm's layers (one switch)
    with use_lightllm_for_gptq():
        model = AutoModelForCausalLM.from_pretrained("someone-elses-gptq/")

How a checkpoint is routed. What lightllm writes stays in the formats other tools read: GPTQ and
RTN as ``quant_method: "gptq"`` (AutoGPTQ, GPTQModel and transformers' own GPTQ path read it),
NF4 / FP4 / int8 as ``quant_method: "bitsandbytes"`` (transformers + bitsandbytes read it). To tell
its own files apart without changing those formats, lightllm records itself where the formats
keep a writer's notes: GPTQ's ``meta.quantizer`` (``["lightllm:<version>"]``, where GPTQModel puts
its own name) and, for bitsandbytes, a ``lightllm`` key in the config (transformers'
``BitsAndBytesConfig`` ignores keys it does not know). transformers' registry has one entry per
``quant_method``, so this module wraps the ``"gptq"`` and ``"bitsandbytes_4bit"`` /
``"bitsandbytes_8bit"`` entries: a config dict carrying lightllm's mark becomes a
:class:`LightllmConfig` (lightllm's quantizer), any other one goes to transformers' own class as
before. A GPTQ checkpoint without the mark goes to lightllm only inside
:func:`use_lightllm_for_gptq` (or after calling it), the one documented switch. Without this
module imported, or inside :func:`without_lightllm`, transformers reads lightllm's files with its
own GPTQ / bitsandbytes support. (:func:`lightllm.quantization.load_quantized` imports this module:
transformers is imported by then anyway.)

Loading a pre-quantized checkpoint: the model is built on the meta device by transformers, its
quantized Linears are replaced here by empty lightllm layers of the checkpoint's shapes (found
from the safetensors headers, no tensor read), and transformers' loader fills them, so
``device_map`` ("cpu", "auto", a dict, disk offload) and ``dtype`` work as for any model: the dense
parameters take ``dtype``, the quantized layers keep their format's dtypes (float16 scales).
Quantizing on load: transformers loads the dense weights, then :func:`lightllm.quantization.quantize_`
runs with the config (all weights must be in memory: no disk offload then).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib
from typing import Any

import torch
from torch import nn

from .._extras import require

require("transformers", "lightllm.integrations.transformers")

from transformers.quantizers import auto as _auto  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from ..quantization import bnb as _bnb  # noqa: E402
from ..quantization.bnb import BnbConfig  # noqa: E402
from ..quantization.core import QuantizationConfig, config_from_dict, make_config, quantize_  # noqa: E402
from ..quantization.gptq.config import QuantConfig  # noqa: E402

logger = logging.getLogger("lightllm")

QUANT_METHOD = "lightllm"
_TRANSFORMERS_MAJOR = int(require("transformers", "lightllm.integrations.transformers").__version__.split(".")[0])
#: the key a bitsandbytes-format config dict written by lightllm carries
BNB_MARK = "lightllm"

__all__ = ["LightllmConfig", "LightllmHfQuantizer", "QUANT_METHOD", "use_lightllm_for_gptq", "without_lightllm",
           "written_by_lightllm"]

_GPTQ_FIELDS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "true_sequential",
                "checkpoint_format")


def written_by_lightllm(quant: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``quantization_config`` dict carries lightllm's mark."""
    meta = quant.get("meta") or {}
    writers = meta.get("quantizer") or [] if isinstance(meta, dict) else []
    if isinstance(writers, str):
        writers = [writers]
    return any(str(w).split(":")[0] == "lightllm" for w in writers) or bool(quant.get(BNB_MARK))


class LightllmConfig(QuantizationConfigMixin):
    """``from_pretrained(..., quantization_config=LightllmConfig(method=..., ...))``: quantize with
    lightllm while loading, into lightllm's layers.

    method: "rtn" or "gptq" (GPTQ format, :class:`~lightllm.nn.QuantLinear`), "nf4" or "fp4"
    (:class:`~lightllm.nn.Linear4bit`), "int8" (:class:`~lightllm.nn.Linear8bitLt`).
    rtn / gptq: ``bits``, ``group_size``, ``sym``, ``desc_act``, ``static_groups``,
    ``damp_percent``, ``true_sequential``, ``checkpoint_format``, as
    :class:`~lightllm.quantization.GPTQConfig`. gptq needs ``calibration`` (token ids
    ``[n_samples, seqlen]``, or a list of tokenizer outputs) or ``dataset`` (a source
    :func:`lightllm.data.load_text` knows: "shakespeare" or a text file, tokenized with the model's
    tokenizer into ``n_samples`` windows of ``seqlen`` tokens drawn with ``seed``).
    nf4 / fp4: ``double_quant`` (default: nf4 True, fp4 False), ``compute_dtype``.
    int8: ``threshold`` (6.0). ``skip_modules``: bitsandbytes formats, module names kept dense.

    The calibration settings are used while loading and are not saved: ``to_dict`` is the
    checkpoint's ``quantization_config`` in the method's format (GPTQ's or bitsandbytes').
    """

    def __init__(self, method: str = "rtn", bits: int | None = None, group_size: int | None = None,
                 sym: bool | None = None, desc_act: bool | None = None, static_groups: bool | None = None,
                 damp_percent: float | None = None, true_sequential: bool | None = None,
                 checkpoint_format: str | None = None, double_quant: bool | None = None,
                 compute_dtype: str | torch.dtype | None = None, threshold: float | None = None,
                 skip_modules: list[str] | None = None, calibration=None, dataset: str | None = None,
                 n_samples: int = 128, seqlen: int = 256, seed: int = 0, config: QuantizationConfig | None = None,
                 **unused):
        self.quant_method = QUANT_METHOD
        if config is None:
            config = _make(method, dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                                        static_groups=static_groups, damp_percent=damp_percent,
                                        true_sequential=true_sequential, checkpoint_format=checkpoint_format),
                           dict(double_quant=double_quant, compute_dtype=compute_dtype, threshold=threshold,
                                skip_modules=skip_modules))
        elif not isinstance(config, QuantizationConfig):
            raise TypeError(f"LightllmConfig: config must be a lightllm quantization config, got {type(config).__name__}")
        if unused:  # a misspelt setting (bit=, groupsize=) must not quantize with the defaults
            raise TypeError(f"LightllmConfig: unknown settings {', '.join(sorted(unused))} (see help(LightllmConfig) "
                            "for the settings of each method)")
        self.lightllm_config = config
        self.method = config.method
        if calibration is not None and dataset is not None:
            raise ValueError("LightllmConfig: give calibration (token ids) or dataset (a corpus name), not both")
        if dataset is not None and not isinstance(dataset, str):
            raise TypeError(f"LightllmConfig: dataset must be a corpus name or a text file path, got {type(dataset).__name__}")
        if n_samples <= 0 or seqlen <= 0:
            raise ValueError(f"LightllmConfig: n_samples and seqlen must be positive, got {n_samples} and {seqlen}")
        self.calibration, self.dataset = calibration, dataset
        self.n_samples, self.seqlen, self.seed = n_samples, seqlen, seed

    @property
    def needs_calibration(self) -> bool:
        return bool(self.lightllm_config.needs_calibration)

    # ---- what transformers reads and writes ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``quantization_config``, in the method's own format, marked as lightllm's."""
        return self.lightllm_config.to_dict()  # GPTQ's meta.quantizer, or BnbConfig's "lightllm" key

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"LightllmConfig({self.lightllm_config!r})"

    def __deepcopy__(self, memo):
        # the calibration tensors are shared, not copied (transformers deep-copies the model config)
        new = copy.copy(self)
        new.lightllm_config = copy.deepcopy(self.lightllm_config, memo)
        return new

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """A checkpoint's ``quantization_config`` (GPTQ or bitsandbytes format) as a LightllmConfig."""
        config = cls(config=_config_from_checkpoint_dict(config_dict))
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs) -> dict[str, Any]:
        unused = {}
        for key, value in kwargs.items():
            if key in ("calibration", "dataset", "n_samples", "seqlen", "seed"):
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused


def _make(method: str, gptq_fields: dict[str, Any], bnb_fields: dict[str, Any]) -> QuantizationConfig:
    method = str(method).lower()
    given_gptq = {k: v for k, v in gptq_fields.items() if v is not None}
    given_bnb = {k: v for k, v in bnb_fields.items() if v is not None}
    if method in ("rtn", "gptq"):
        if given_bnb:
            raise ValueError(f"LightllmConfig: {', '.join(given_bnb)} are bitsandbytes settings, not {method}'s")
        return make_config(method, **given_gptq)
    if method in ("nf4", "fp4", "int8"):
        if given_gptq:
            raise ValueError(f"LightllmConfig: {', '.join(given_gptq)} are GPTQ settings; method {method!r} fixes its "
                             "own grid (4-bit blocks of 64, or int8 per row)")
        if method == "int8":
            if "double_quant" in given_bnb or "compute_dtype" in given_bnb:
                raise ValueError("LightllmConfig: double_quant and compute_dtype are 4-bit settings, not int8's")
            return make_config("int8", **given_bnb)
        if "threshold" in given_bnb:
            raise ValueError(f"LightllmConfig: threshold is an int8 setting, not {method}'s")
        return make_config(method, **given_bnb)
    raise ValueError(f"LightllmConfig: unknown method {method!r}; one of rtn, gptq, nf4, fp4, int8")


def _config_from_checkpoint_dict(quant: dict[str, Any]) -> QuantizationConfig:
    quant = dict(quant)
    method = str(quant.get("quant_method", "gptq")).lower()
    if method == QUANT_METHOD:
        raise ValueError("a quantization_config with quant_method 'lightllm' is not a checkpoint format; lightllm "
                         "writes 'gptq' or 'bitsandbytes'")
    if method == "gptq":
        # transformers' GPTQConfig writes the zero convention as "format"; GPTQModel as checkpoint_format
        fmt = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
        if quant.get("is_marlin_format"):
            fmt = "marlin"
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported by lightllm (it reads 'gptq' and "
                             "'gptq_v2')")
        quant["checkpoint_format"] = fmt
    return config_from_dict(quant)


# ---- the switch for other tools' GPTQ checkpoints -------------------------------------------------

_route_all_gptq = False


class use_lightllm_for_gptq:
    """Load GPTQ checkpoints written by other tools (GPTQModel, AutoGPTQ, transformers + optimum)
    into lightllm's :class:`~lightllm.nn.QuantLinear` with ``from_pretrained``, without editing
    their files. Call it (``use_lightllm_for_gptq()``; ``use_lightllm_for_gptq(False)`` turns it
    off) or use it as a context manager, which restores the previous setting on exit."""

    def __init__(self, enabled: bool = True):
        global _route_all_gptq
        self._previous, _route_all_gptq = _route_all_gptq, bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _route_all_gptq
        _route_all_gptq = self._previous
        return False


_route_ours = True


class without_lightllm:
    """Inside it (or after calling it), ``from_pretrained`` reads every checkpoint with
    transformers' own support, lightllm's files too (transformers' GPTQ path, or bitsandbytes
    layers), as if this integration were not imported; ``without_lightllm(False)`` or leaving the
    context restores lightllm's routing."""

    def __init__(self, enabled: bool = True):
        global _route_ours
        self._previous, _route_ours = _route_ours, not enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _route_ours
        _route_ours = self._previous
        return False


class _Dispatch:
    """Stands in transformers' config registry for a ``quant_method`` it already serves: a dict
    lightllm wrote (or any GPTQ one under :func:`use_lightllm_for_gptq`) becomes a
    :class:`LightllmConfig`, anything else goes to transformers' own class unchanged."""

    def __init__(self, original: type, gptq: bool):
        self.original, self.gptq = original, gptq
        self.__name__ = original.__name__  # what transformers' messages print

    def from_dict(self, config_dict, return_unused_kwargs=False, **kwargs):
        if _route_ours and (written_by_lightllm(config_dict) or (self.gptq and _route_all_gptq)):
            return LightllmConfig.from_dict(config_dict, return_unused_kwargs, **kwargs)
        return self.original.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


# ---- the quantizer --------------------------------------------------------------------------------

class LightllmHfQuantizer(HfQuantizer):
    """transformers' side of lightllm: builds lightllm's layers in ``from_pretrained``."""

    requires_calibration = False
    quantization_config: LightllmConfig

    def __init__(self, quantization_config: LightllmConfig, **kwargs):
        if not isinstance(quantization_config, LightllmConfig):
            raise TypeError(f"LightllmHfQuantizer needs a LightllmConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, device_map=None, **kwargs):
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("LightllmConfig: quantizing while loading needs every weight in memory; a device_map "
                             "offloading to 'disk' is supported when loading a checkpoint already quantized (quantize "
                             "and save_pretrained first)")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        config = self.quantization_config.lightllm_config
        files = checkpoint_files or _find_checkpoint_files(model)
        shapes = _checkpoint_shapes(files)
        _install_empty_layers(model, shapes, config)
        self._files = files
        if isinstance(config, BnbConfig):
            self._held = _hold_bnb_layers(model, files, config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config.lightllm_config
        if self.pre_quantized:
            _put_back(model, getattr(self, "_held", {}))
            self._held = {}
            _after_loading(model, config, getattr(self, "_files", None))
        else:
            on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
            if on_meta:
                raise ValueError(f"LightllmConfig: quantizing while loading needs every weight in memory, but "
                                 f"{on_meta[0]} is offloaded; load without disk offload, then save_pretrained")
            calibration = self._calibration(model) if config.needs_calibration else None
            quantize_(model, config, calibration, progress=False)
        model.lightllm_quant_config = config
        return model

    def _calibration(self, model):
        q = self.quantization_config
        if q.calibration is not None:
            return q.calibration
        if q.dataset is None:
            raise ValueError("LightllmConfig(method='gptq') needs calibration data: calibration=<token ids "
                             "[n_samples, seqlen]> or dataset='shakespeare' (or a text file)")
        from .. import data

        transformers = require("transformers", "LightllmConfig(dataset=...)")
        from ..eval import tokenize_stream

        tokenizer = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
        ids = tokenize_stream(tokenizer, data.load_text(q.dataset, split="train"))
        return data.calibration_samples(ids, q.n_samples, q.seqlen, seed=q.seed)

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA on lightllm's layers (lightllm.tuning, or peft through lightllm.integrations.peft)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True


def _find_checkpoint_files(model) -> list[pathlib.Path]:
    """The weight files of the directory the model is loaded from (transformers versions that do
    not pass them to the quantizer)."""
    from ..quantization.checkpoint import weight_files

    directory = pathlib.Path(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))
    if not directory.is_dir():
        raise ValueError(f"lightllm: cannot find the checkpoint files of {directory}")
    return weight_files(directory)


def _checkpoint_shapes(files) -> dict[str, torch.Tensor]:
    """{key: a meta tensor of the stored shape and dtype} over the checkpoint's files: the
    safetensors headers only, no tensor data read (.bin files are memory-mapped)."""
    shapes: dict[str, torch.Tensor] = {}
    for path in map(pathlib.Path, files):
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)
                shapes[key] = torch.empty(info["shape"], dtype=dtype, device="meta")
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({k: v for k, v in state.items() if torch.is_tensor(v)})
    return shapes


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _install_empty_layers(model: nn.Module, shapes: dict[str, torch.Tensor], config: QuantizationConfig) -> None:
    from ..quantization.checkpoint import _install_quant_linears

    if isinstance(config, BnbConfig):
        _bnb.install_bnb_layers(model, shapes, config)
    elif isinstance(config, QuantConfig):
        quant = config.to_dict()
        # transformers 4.x loads a module's buffers one at a time through its _load_from_state_dict,
        # where an act-order QuantLinear reorders its weight: that needs real (if empty) buffers
        # beside the one being loaded (the layers are read again whole after the loader, see _after_loading)
        _install_quant_linears(model, shapes, quant, device="meta" if _TRANSFORMERS_MAJOR >= 5 else None)
    else:
        raise TypeError(f"lightllm: no checkpoint layout for {type(config).__name__}")


class _Held(nn.Module):
    """Holds a bitsandbytes-format layer's place while transformers' loader runs: the layer was
    filled from the checkpoint already (its packed weight and quantization state are not tensors
    transformers' loader can set on a module), and an empty placeholder gives the loader nothing
    to overwrite."""


def _read_tensors(files, wanted) -> dict[str, torch.Tensor]:
    """The tensors named by ``wanted(key)`` from the checkpoint files (only those are read)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in map(pathlib.Path, files):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                out.update({key: f.get_tensor(key) for key in f.keys() if wanted(key)})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            out.update({key: t for key, t in state.items() if wanted(key)})
    return out


def _hold_bnb_layers(model: nn.Module, files, config: BnbConfig) -> dict[str, nn.Module]:
    """Fill every bitsandbytes-format layer from the checkpoint (as load_quantized does) and put a
    placeholder in its place until the loader has run; {name: filled layer}.

    These layers are read into host memory whatever the ``device_map`` says: a block mapped to
    "disk" keeps its packed NF4 / int8 weights in RAM (transformers' loader cannot set a packed
    weight's quantization state, so it never sees them). GPTQ-format layers do follow "disk"."""
    import re

    from ..quantization.checkpoint import CheckpointError
    from ..quantization.core import replace_module

    names = [name for name, m in model.named_modules() if isinstance(m, config.layer_type)]
    prefixes = tuple(name + "." for name in names)
    state = _read_tensors(files, lambda key: key.startswith(prefixes))
    held = {}
    for name in names:
        layer = model.get_submodule(name)
        own = {key[len(name) + 1:]: t for key, t in state.items() if key.startswith(name + ".")}
        missing, unexpected = layer.load_state_dict(own, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(f"{name}: the checkpoint's tensors do not fit its {type(layer).__name__} "
                                  f"(missing {missing}, unexpected {unexpected})")
        held[name] = layer
        replace_module(model, name, _Held())
    # the loader reports the checkpoint's tensors of held layers as unused: they are not
    patterns = ["^" + re.escape(name) + r"\." for name in names]
    existing = model._keys_to_ignore_on_load_unexpected
    # transformers 5 keeps a set here, 4.x a list
    model._keys_to_ignore_on_load_unexpected = (existing | set(patterns) if isinstance(existing, set)
                                                else list(existing or []) + patterns)
    return held


def _put_back(model: nn.Module, held: dict[str, nn.Module]) -> None:
    """The held layers back in place: on the device of the nearest enclosing module that holds
    tensors (what the device_map gave their block), biases in the model's dense dtype."""
    from ..quantization.core import replace_module

    floating = [p.dtype for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"]
    for name, layer in held.items():
        device, parts = torch.device("cpu"), name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = model.get_submodule(".".join(parts[:depth]))
            tensors = [t for t in (*ancestor.parameters(), *ancestor.buffers()) if t.device.type != "meta"]
            if tensors:
                device = tensors[0].device
                break
        layer.to(device)
        if floating and layer.bias is not None and layer.bias.dtype != floating[0]:
            layer.bias = nn.Parameter(layer.bias.to(floating[0]), requires_grad=layer.bias.requires_grad)
        replace_module(model, name, layer)


def _after_loading(model: nn.Module, config: QuantizationConfig, files=None) -> None:
    """What load_quantized does after the tensors are in: the zero convention checked from the
    data (GPTQ), every quantized layer filled."""
    from ..quantization.checkpoint import _fix_zero_convention

    kinds = config.layer_types()
    if isinstance(config, QuantConfig) and files and _TRANSFORMERS_MAJOR < 5:
        # transformers 4.x casts every floating tensor a quantizer loads to the model's dtype (the
        # format's float16 scales too) and sets buffers one at a time through _load_from_state_dict
        # (an act-order layer would reorder a half-loaded weight): read the layers again, whole
        names = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not _offloaded(m)}
        prefixes = tuple(n + "." for n in names)
        state = _read_tensors(files, lambda key: key.startswith(prefixes))
        for name, module in names.items():
            device = module.qweight.device
            own = {k[len(name) + 1:]: t.to(device) for k, t in state.items() if k.startswith(name + ".")}
            module.load_state_dict(own, strict=True, assign=True)
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            meta = [k for k, t in module.state_dict().items() if t.device.type == "meta"]
            if meta and not _offloaded(module):
                raise ValueError(f"lightllm: the checkpoint did not fill {name}.{meta[0]}")
    if isinstance(config, QuantConfig):
        quant = config.to_dict()
        state = {f"{n}.qzeros": m.qzeros for n, m in model.named_modules()
                 if isinstance(m, config.layer_type) and m.qzeros.device.type != "meta"}
        _fix_zero_convention(model, state, quant)


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


# ---- registration ---------------------------------------------------------------------------------

def _register() -> None:
    configs, quantizers = _auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.AUTO_QUANTIZER_MAPPING
    if configs.get(QUANT_METHOD) is not LightllmConfig:
        if QUANT_METHOD in configs:  # a stale class from a reloaded module
            del configs[QUANT_METHOD]
        _auto.register_quantization_config(QUANT_METHOD)(LightllmConfig)
    if quantizers.get(QUANT_METHOD) is not LightllmHfQuantizer:
        if QUANT_METHOD in quantizers:
            del quantizers[QUANT_METHOD]
        _auto.register_quantizer(QUANT_METHOD)(LightllmHfQuantizer)
    # transformers' registry has no hook for "this quant_method, but only these files": wrap its
    # entries so lightllm's own files (and, under the switch, other GPTQ ones) come here
    for key in ("gptq", "bitsandbytes_4bit", "bitsandbytes_8bit"):
        current = configs.get(key)
        if current is None:
            continue
        original = current.original if isinstance(current, _Dispatch) else current
        configs[key] = _Dispatch(original, gptq=key == "gptq")


_register()
