"""AdapterModel: bottleneck adapters on the shared tuner base, with LLM-Adapters' files.

``get_peft_model(model, AdapterConfig(...))`` wraps each target in an :class:`AdapterLayer`; the
targets, placements and bottleneck sizes come from the config and, where it leaves them open, from
the model's type (config.py). Files: LLM-Adapters' layout (``adapter_config.json`` with
``peft_type: "BOTTLENECK"``; ``adapter_model.safetensors``, or ``adapter_model.bin`` as
LLM-Adapters writes it, with keys ``base_model.model.<module>.adapter_down.weight`` /
``.adapter_up.weight`` / ``.adapter_scaling``, plus ``.bias`` keys for adapters with biases) and
AdapterHub's (adapterhub.py).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import torch
from torch import nn

from ..layers import base_features
from ..tuner import PREFIX, TunerModel
from .config import (ADAPTER_TYPE_BY_NAME, ADAPTERP_TARGETS, BOTTLENECK_TARGETS, PARALLEL_TARGETS, PRESET_VALUES,
                     RESIDUAL_PLACEMENTS, SUBLAYERS, AdapterConfig)
from .layer import AdapterLayer, adapter_widths

logger = logging.getLogger("lightllm")


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def sublayer_of(model_type: str | None, name: str) -> tuple[str, str, str] | None:
    """(site, decoder layer path, norm path) when module ``name`` is the output of a decoder layer's
    attention or FFN sublayer in a model type lightllm knows, else None."""
    for site, (suffix, norm) in SUBLAYERS.get(model_type, {}).items():
        if name.endswith("." + suffix):
            layer = name[: -len(suffix) - 1]
            return site, layer, f"{layer}.{norm}"
    return None


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


class AdapterModel(TunerModel):
    """The model with bottleneck adapters (``base_model.model`` is the user's model, as in PEFT)."""

    layer_type = AdapterLayer
    config_type = AdapterConfig
    method_name = "bottleneck adapter"
    layer_bias_value = "adapter_only"

    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return self.tuner_layers()

    def _prepare_config(self, config: AdapterConfig) -> AdapterConfig:
        """Fill in what the model decides, as LLM-Adapters does: the default targets of the
        config's variant (or preset) for the model's type."""
        model_type = model_type_of(self.model)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        if config.target_modules is not None:
            return config
        if config.preset is not None:
            if model_type not in SUBLAYERS:
                raise ValueError(f"AdapterConfig: preset {config.preset!r} finds its targets for model types "
                                 f"{sorted(SUBLAYERS)}, not {model_type!r}; set target_modules (the modules whose "
                                 "output is each sublayer's output)")
            sites = PRESET_VALUES[config.preset]["sites"]
            targets = [SUBLAYERS[model_type][site][0] for site in sites]
            names = [n for n, _ in self.model.named_modules()]
            missing = [t for t in targets if not any(n.endswith("." + t) for n in names)]
            if missing:  # a model of the family built differently (experts instead of an MLP, say)
                raise ValueError(f"AdapterConfig: preset {config.preset!r} needs modules named {missing} in this "
                                 f"{model_type} model and finds none; set target_modules")
            config.target_modules = targets
            return config
        table, variant = ((PARALLEL_TARGETS, "use_parallel_adapter") if config.use_parallel_adapter
                          else (ADAPTERP_TARGETS, "use_adapterp") if config.use_adapterp
                          else (BOTTLENECK_TARGETS, "the bottleneck adapter"))
        if model_type not in table:
            raise ValueError(f"AdapterConfig: no default target_modules for model type {model_type!r} ({variant}); "
                             f"known: {sorted(table)}. Set target_modules")
        config.target_modules = list(table[model_type])
        return config

    def _placement(self, name: str, config: AdapterConfig) -> str:
        if config.placement is not None:
            return config.placement
        if config.use_parallel_adapter:
            return "parallel"
        model_type = model_type_of(self.model)
        by_name = ADAPTER_TYPE_BY_NAME.get(model_type, {})
        leaf = name.rpartition(".")[2]
        if leaf not in by_name:
            raise ValueError(f"AdapterConfig: LLM-Adapters places an adapter by the module's name ({by_name or 'no '}"
                             f"names known for model type {model_type!r}), and {name} is not one of them; set "
                             "placement ('mh', 'output', 'parallel', 'output_residual' or 'parallel_residual')")
        return by_name[leaf]

    def _layer_info(self, name: str, module: nn.Module, config: AdapterConfig) -> dict[str, Any]:
        placement = self._placement(name, config)
        width_in, _ = adapter_widths(*base_features(_base(module)), placement)
        if config.reduction_factor is not None:
            bottleneck = max(1, int(width_in // config.reduction_factor))
        else:
            bottleneck = config.bottleneck_size
        norm = None
        if placement in RESIDUAL_PLACEMENTS:
            found = sublayer_of(model_type_of(self.model), name)
            if found is None:
                known = {t: [s for s, _ in v.values()] for t, v in SUBLAYERS.items() if t in ("llama", "gpt2")}
                raise ValueError(f"AdapterConfig: placement {placement!r} reads the residual stream, which lightllm finds "
                                 f"for the sublayer outputs of known model types ({known}); {name} of model type "
                                 f"{model_type_of(self.model)!r} is not one of them")
            norm = found[2]
            try:
                self.model.get_submodule(norm)
            except AttributeError:
                raise ValueError(f"AdapterConfig: {name} should have the norm {norm} in front of its sublayer, "
                                 "and the model has none") from None
        return {"placement": placement, "bottleneck": bottleneck, "norm": norm}

    def _add_to_layer(self, layer: AdapterLayer, adapter_name: str, config: AdapterConfig, info, name: str) -> None:
        layer.add_adapter(adapter_name, info["placement"], info["bottleneck"], config.non_linearity, config.scaling,
                          config.adapter_dropout, config.dropout_on_output, config.adapter_bias, config.init_weights)
        if info["norm"] is not None:
            layer.attach_residual_source(self.model.get_submodule(info["norm"]))

    def _release_layer(self, layer: AdapterLayer) -> None:
        layer.detach_residual_source()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for layer in self.adapter_layers().values():
            if not any(s.placement in RESIDUAL_PLACEMENTS for s in layer.settings.values()):
                layer.detach_residual_source()

    def merge_adapter(self, requantize: bool = False) -> None:
        raise ValueError("bottleneck adapters apply a nonlinearity between their two projections, so no change of the "
                         "base weights reproduces them: they cannot be merged. Keep the wrapped model for inference, "
                         "or call unload() to get the base model back without them")

    # ---- LLM-Adapters' files --------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """LLM-Adapters' saved names: its wrapped layer is an nn.Linear subclass, so a trained bias of
        one is ``<module>.bias`` (PEFT's LoRA saves ``<module>.base_layer.bias``)."""
        return {k.replace(".base_layer.bias", ".bias") if k.endswith(".base_layer.bias") else k: v
                for k, v in super().adapter_state_dict(adapter_name).items()}

    def _layer_state(self, name: str, layer: AdapterLayer, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {}
        for part, linear in (("adapter_down", layer.adapter_down[adapter_name]), ("adapter_up", layer.adapter_up[adapter_name])):
            out[f"{PREFIX}{name}.{part}.weight"] = linear.weight
            if linear.bias is not None:
                out[f"{PREFIX}{name}.{part}.bias"] = linear.bias
        if adapter_name in layer.adapter_scaling:
            out[f"{PREFIX}{name}.adapter_scaling"] = layer.adapter_scaling[adapter_name]
        return out

    def _expected_layer_tensors(self, name, module, info, config, existing, path):
        if existing is not None:
            if not (isinstance(module, AdapterLayer) and existing in module.adapter_down):
                raise ValueError(f"{path}: the file's configuration puts an adapter on {name}, where adapter "
                                 f"{existing!r} has none; load it under a new adapter name")
            have = module.settings[existing]
            want = {"placement": info["placement"], "non_linearity": config.non_linearity,
                    "scaling": "learned" if config.scaling == "learned" else "fixed"}
            got = {"placement": have.placement, "non_linearity": have.non_linearity,
                   "scaling": "learned" if have.scaling == "learned" else "fixed"}
            if config.scaling != "learned" and have.scaling != "learned" and config.scaling != have.scaling:
                want["scaling"], got["scaling"] = config.scaling, have.scaling
            differ = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            if differ:
                raise ValueError(f"{path}: the file's adapter on {name} differs from adapter {existing!r} in "
                                 + ", ".join(f"{k} (the adapter's {a!r}, the file's {b!r})" for k, (a, b) in differ.items())
                                 + "; load it under a new adapter name")
            shapes = {f"{part}.{p}": tuple(t.shape) for part in ("adapter_down", "adapter_up")
                      for p, t in getattr(module, part)[existing].named_parameters()}
            if existing in module.adapter_scaling:
                shapes["adapter_scaling"] = (1,)
        else:
            width_in, width_out = adapter_widths(*base_features(_base(module)), info["placement"])
            b = info["bottleneck"]
            shapes = {"adapter_down.weight": (b, width_in), "adapter_up.weight": (width_out, b)}
            if config.adapter_bias:
                shapes.update({"adapter_down.bias": (b,), "adapter_up.bias": (width_out,)})
            if config.scaling == "learned":
                shapes["adapter_scaling"] = (1,)
        return {f"{PREFIX}{name}.{key}": (key, name, shape) for key, shape in shapes.items()}

    def _copy_layer_tensor(self, layer: AdapterLayer, kind: str, adapter_name: str, value: torch.Tensor) -> None:
        if kind == "adapter_scaling":
            dest = layer.adapter_scaling[adapter_name]
        else:
            part, _, param = kind.partition(".")
            dest = getattr(getattr(layer, part)[adapter_name], param)
        dest.copy_(value.reshape(dest.shape).to(dest.dtype))

    def save_pretrained(self, directory, selected_adapters: list[str] | None = None, safe_serialization: bool = True,
                        format: str = "llm-adapters") -> None:
        """Write adapters in LLM-Adapters' layout (``format="llm-adapters"``: PEFT's folder layout,
        adapter_model.safetensors, or adapter_model.bin with ``safe_serialization=False`` as
        LLM-Adapters itself writes) or AdapterHub's (``format="adapterhub"``: adapter_config.json +
        adapter.safetensors or pytorch_adapter.bin, readable by the ``adapters`` library's
        ``load_adapter``). Adapters other than "default" go in a sub-folder of their name."""
        if format == "llm-adapters":
            return super().save_pretrained(directory, selected_adapters, safe_serialization)
        if format != "adapterhub":
            raise ValueError(f"AdapterModel.save_pretrained: format must be 'llm-adapters' or 'adapterhub', got {format!r}")
        from . import adapterhub

        root = pathlib.Path(directory)
        for adapter in selected_adapters or list(self.peft_config):
            if adapter not in self.peft_config:
                raise ValueError(f"no adapter named {adapter!r}; adapters: {sorted(self.peft_config)}")
            adapterhub.save(self, adapter, root if adapter == "default" else root / adapter, safe_serialization)

    @classmethod
    def read_adapter(cls, directory):
        from . import adapterhub

        found = adapterhub.read_folder(pathlib.Path(directory))
        if found is not None:
            _, config, tensors, path = found
            return config, tensors, path
        return super().read_adapter(directory)
