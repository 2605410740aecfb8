"""AdapterHub's bottleneck adapter files (the ``adapters`` library), read and written.

Folder: ``adapter_config.json`` ({"config": the BnConfig dict, "hidden_size", "model_class",
"model_name", "model_type", "name", "version"}) and the weights, ``adapter.safetensors`` or
``pytorch_adapter.bin``, keyed ``<decoder layer>.attention_adapters.adapters.<name>.<param>`` (the
adapter after the attention sublayer, config ``mh_adapter``) and ``<decoder
layer>.output_adapters.adapters.<name>.<param>`` (after the FFN, ``output_adapter``), with params
``adapter_down.0.weight/bias`` (the down projection; index 1 of its Sequential is the activation),
``adapter_up.weight/bias`` and ``scaling`` (a learned scaling).

On a pre-LN decoder (LLaMA and its relatives, where the library's layer norm argument is None) its
three bottleneck kinds are lightllm placements on the sublayer's output module (o_proj, down_proj):
``original_ln_before=False`` is ``output`` (o + A(o); double_seq_bn, Houlsby),
``original_ln_before=True`` is ``output_residual`` (o + A(o + r); seq_bn, Pfeiffer), and
``is_parallel`` is ``parallel_residual`` (o + A(r); par_bn). Options with other math (layer norms
inside the adapter, gating, PHM layers, invertible adapters, channel scaling, stochastic depth,
per-layer reduction factors) are refused by name.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import torch

from ..save_load import json_writer, read_json, read_tensors, tensors_writer, write_files_atomically
from ..tuner import PREFIX
from .config import SUBLAYERS, AdapterConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
SITES = {"attention": "attention_adapters", "ffn": "output_adapters"}
_PARAMS = {"adapter_down.0.weight": "adapter_down.weight", "adapter_down.0.bias": "adapter_down.bias",
           "adapter_up.weight": "adapter_up.weight", "adapter_up.bias": "adapter_up.bias",
           "scaling": "adapter_scaling"}
# Values of the BnConfig options whose other values lightllm does not implement.
_REQUIRED = {"ln_before": False, "ln_after": False, "use_gating": False, "adapter_residual_before_ln": False,
             "residual_before_ln": True, "original_ln_after": True, "phm_layer": False, "inv_adapter": None,
             "cross_adapter": False}
# The BnConfig the library writes (adapters 1.3.0): every key, with the values lightllm writes for
# the options it does not use.
_BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": False,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # files without a version: the old names


def is_adapterhub_config(raw: dict[str, Any]) -> bool:
    return isinstance(raw.get("config"), dict) and "peft_type" not in raw and "model_type" in raw


def read_folder(path: pathlib.Path):
    """(AdapterModel, config, tensors in lightllm's key layout, weights path) of an AdapterHub
    folder, or None when ``path`` is not one."""
    if not (path / CONFIG_NAME).is_file():
        return None
    raw = read_json(path / CONFIG_NAME)
    if not is_adapterhub_config(raw):
        return None
    from .model import AdapterModel

    file_tensors, weights = read_tensors(path, WEIGHTS)
    config = config_from_adapterhub(raw, file_tensors, path / CONFIG_NAME)
    return AdapterModel, config, to_lightllm_keys(raw, file_tensors, weights), weights


def config_from_adapterhub(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path) -> AdapterConfig:
    c = dict(raw["config"])
    model_type = raw["model_type"]
    architecture = c.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise ValueError(f"{path}: AdapterHub architecture {architecture!r} is not a bottleneck adapter")
    for key, value in _REQUIRED.items():
        if key in c and c[key] != value:
            raise ValueError(f"{path}: AdapterHub option {key}={c[key]!r} is not supported by lightllm (only {value!r})")
    if float(c.get("stochastic_depth") or 0.0) > 0:
        raise ValueError(f"{path}: AdapterHub option stochastic_depth={c['stochastic_depth']!r} is not supported")
    if c.get("scaling", 1.0) == "channel":
        raise ValueError(f"{path}: AdapterHub option scaling='channel' is not supported (a number or 'learned')")
    factor = c.get("reduction_factor", 16)
    if isinstance(factor, dict):
        if set(factor) != {"default"}:
            raise ValueError(f"{path}: per-layer reduction factors {factor} are not supported")
        factor = factor["default"]
    if model_type not in SUBLAYERS:
        raise ValueError(f"{path}: AdapterHub adapters for model type {model_type!r} are not supported; lightllm "
                         f"places them for {sorted(SUBLAYERS)}")
    sites = [site for site, flag in (("attention", "mh_adapter"), ("ffn", "output_adapter")) if c.get(flag)]
    if not sites:
        raise ValueError(f"{path}: the AdapterHub config puts the adapter nowhere (mh_adapter and output_adapter false)")
    placement = ("parallel_residual" if c.get("is_parallel") else
                 "output_residual" if c.get("original_ln_before") else "output")
    activation = c.get("non_linearity", "relu")
    if "version" not in raw:
        activation = _ACTIVATION_RENAME.get(activation, activation)
    layers = None
    if c.get("leave_out"):
        layers = sorted({int(m.group(1)) for k in tensors if (m := re.search(r"\.(\d+)\.(?:attention|output)_adapters\.", k))})
    return AdapterConfig(
        target_modules=[SUBLAYERS[model_type][site][0] for site in sites], placement=placement,
        reduction_factor=float(factor), non_linearity=activation, scaling=c.get("scaling", 1.0), adapter_bias=True,
        init_weights=c.get("init_weights", "bert") if c.get("init_weights") in ("bert", "mam_adapter", "houlsby") else "bert",
        adapter_dropout=float(c.get("dropout") or 0.0), dropout_on_output=True, layers_to_transform=layers,
        base_model_name_or_path=raw.get("model_name"),
    )


def to_lightllm_keys(raw: dict[str, Any], tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The file's tensors under lightllm's saved names (``base_model.model.<module>.adapter_...``)."""
    name = raw.get("name")
    model_type = raw["model_type"]
    sites = {v: k for k, v in SITES.items()}
    pattern = re.compile(r"^(?P<layer>.+)\.(?P<site>attention_adapters|output_adapters)\.adapters\.(?P<name>[^.]+)\."
                         r"(?P<param>.+)$")
    out = {}
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None or m.group("param") not in _PARAMS:
            raise ValueError(f"{path}: {key} is not a bottleneck adapter tensor lightllm knows")
        if name is not None and m.group("name") != name:
            raise ValueError(f"{path}: {key} belongs to adapter {m.group('name')!r}, but the config names {name!r}")
        module = f"{m.group('layer')}.{SUBLAYERS[model_type][sites[m.group('site')]][0]}"
        out[f"{PREFIX}{module}.{_PARAMS[m.group('param')]}"] = value
    return out


def save(wrapper, adapter_name: str, out: pathlib.Path, safetensors: bool = True) -> None:
    """Write one adapter of ``wrapper`` (an AdapterModel) in AdapterHub's layout; refuses what
    AdapterHub cannot express (say which)."""
    from .model import model_type_of, sublayer_of

    config: AdapterConfig = wrapper.peft_config[adapter_name]
    model = wrapper.model
    model_type = model_type_of(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    where = f"adapter {adapter_name!r} cannot be written in AdapterHub's format:"
    if config.placement not in ("output", "output_residual", "parallel_residual"):
        raise ValueError(f"{where} AdapterHub places adapters on sublayer outputs (placements output, output_residual, "
                         f"parallel_residual), not {config.placement!r}")
    if config.adapter_dropout > 0 and not config.dropout_on_output:
        raise ValueError(f"{where} AdapterHub applies dropout to the adapter's output; this adapter drops its input")
    layers = {n: layer for n, layer in wrapper.adapter_layers().items() if adapter_name in layer.adapter_down}
    sites, tensors, bottlenecks = set(), {}, set()
    for name, layer in layers.items():
        found = sublayer_of(model_type, name)
        if found is None:
            raise ValueError(f"{where} {name} is not a sublayer output AdapterHub knows for model type {model_type!r}")
        site, layer_path, _ = found
        sites.add(site)
        prefix = f"{layer_path}.{SITES[site]}.adapters.{adapter_name}."
        down, up = layer.adapter_down[adapter_name], layer.adapter_up[adapter_name]
        bottlenecks.add(down.weight.shape[0])
        # AdapterHub's projections always have biases: an adapter without them writes zeros (the same math).
        tensors[prefix + "adapter_down.0.weight"] = down.weight
        tensors[prefix + "adapter_down.0.bias"] = down.bias if down.bias is not None else torch.zeros_like(down.weight[:, 0])
        tensors[prefix + "adapter_up.weight"] = up.weight
        tensors[prefix + "adapter_up.bias"] = up.bias if up.bias is not None else torch.zeros_like(up.weight[:, 0])
        if adapter_name in layer.adapter_scaling:
            tensors[prefix + "scaling"] = layer.adapter_scaling[adapter_name]
    if hidden is None:
        raise ValueError(f"{where} the model's config has no hidden_size, which AdapterHub's config records")
    if len(bottlenecks) != 1:
        raise ValueError(f"{where} AdapterHub needs one bottleneck size for every layer (hidden_size // reduction_factor), "
                         f"got {sorted(bottlenecks)}")
    (b,) = bottlenecks
    factor = hidden / b
    if int(hidden // factor) != b:  # the library computes int(hidden // factor): find a factor that gives b
        factor = hidden / (b + 0.5)
    if int(hidden // factor) != b:
        raise ValueError(f"{where} no reduction factor gives a bottleneck of {b} for hidden size {hidden}")
    bn = dict(_BN_DEFAULTS)
    bn.update(mh_adapter="attention" in sites, output_adapter="ffn" in sites,
              is_parallel=config.placement == "parallel_residual",
              original_ln_before=config.placement == "output_residual",
              reduction_factor=factor if factor != int(factor) else int(factor), non_linearity=config.non_linearity,
              scaling=config.scaling, dropout=config.adapter_dropout, init_weights=config.init_weights)
    raw = {"config": bn, "hidden_size": hidden, "model_class": type(model).__name__,
           "model_name": getattr(model, "name_or_path", "") or "", "model_type": model_type, "name": adapter_name,
           "version": "lightllm"}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_files_atomically(out, {
        WEIGHTS[0] if safetensors else WEIGHTS[1]: tensors_writer(tensors, safetensors),
        CONFIG_NAME: json_writer(raw),
    })
