"""LoRA adapters with PEFT's configuration, module layout and files.

``get_peft_model(model, LoraConfig(...))`` wraps every matching layer (nn.Linear, transformers'
GPT-2 Conv1D, lightllm's QuantLinear) in a :class:`lightllm.nn.LoraLinear`:
``y = base(x) + scaling * lora_B(lora_A(dropout(x)))``, scaling = lora_alpha / r (or / sqrt(r) with
rsLoRA), A initialized like nn.Linear (Kaiming-uniform, a = sqrt(5)) and B with zeros, so a new
adapter changes nothing. Only adapter parameters train, plus what ``bias`` ("all": every bias;
"lora_only": the wrapped layers' biases) and ``modules_to_save`` (a trainable copy of each named
module per adapter, PEFT's ModulesToSaveWrapper) ask for.

Files are PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (adapter name removed), the
trained biases under their parameter names and each modules_to_save copy under the module's own
name; adapters other than "default" in a sub-folder of their name. A load checks every tensor
against the model before it changes anything.

The layers run fused (lightllm/nn/lora.py): the rank-r term in the base GEMM's epilogue, one launch
at decode sizes; on a QuantLinear base (QLoRA) the dequant-matmul kernel takes it, in training too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ..nn.lora import LoraLinear, base_features, is_conv1d
from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("lightllm")

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

# PEFT options that change the math and that lightllm does not implement: refused, never ignored.
_REFUSED = {
    "use_dora": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "layer_replication": lambda v: v is not None,
    "target_parameters": lambda v: bool(v),
    "use_qalora": lambda v: bool(v),
    "megatron_config": lambda v: v is not None,
    "trainable_token_indices": lambda v: v is not None,
    "alora_invocation_tokens": lambda v: v is not None,
    "velora_config": lambda v: v is not None,
    "monteclora_config": lambda v: v is not None,
    "use_bdlora": lambda v: bool(v),
    "arrow_config": lambda v: v is not None,
    "kasa_config": lambda v: v is not None,
    "ensure_weight_tying": lambda v: bool(v),
}


@dataclasses.dataclass
class LoraConfig:
    """PEFT's LoraConfig fields and defaults (the ones lightllm implements)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported "
                             "(True, False or 'gaussian')")
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig: peft_type must be 'LORA', got {self.peft_type!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("LoraConfig: layers_to_transform and layers_pattern need target_modules as a list "
                             "(with a regex, put the layers into the regex), as in PEFT")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(d[key], list):
                d[key] = sorted(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        d = dict(d)
        for key, refused in _REFUSED.items():
            if key in d and refused(d[key]):
                raise ValueError(f"LoraConfig: {key}={d[key]!r} changes the adapter's math and is not supported "
                                 "by lightllm")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter type {d.get('peft_type')!r} is not LoRA")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _REFUSED)
        if unknown:
            logger.info("LoraConfig: ignoring fields %s", unknown)
        return cls(**{k: v for k, v in d.items() if k in names})


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear)) or is_conv1d(module)


def _matches(name: str, config: LoraConfig, model: nn.Module, module: nn.Module) -> bool:
    """PEFT's target_modules rules: a list matches a module whose name equals an entry or ends with
    '.' + entry; a string is a full regex match; 'all-linear' is every Linear except the output head."""
    targets = config.target_modules
    if targets is None:
        raise ValueError("LoraConfig.target_modules is required (a list of module names, a regex, or 'all-linear')")
    if targets == "all-linear":
        if not _wrappable(module):
            return False
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return module is not head and not (isinstance(head, ModulesToSaveWrapper) and module is head.original_module)
    matched = _names_match(name, targets)
    if matched and config.layers_to_transform is not None:
        matched = _layer_index_ok(name, config)
    return matched


def _names_match(name: str, entries: list[str] | str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a full regex match; a list
    matches a module whose name equals an entry or ends with '.' + entry."""
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == t or name.endswith("." + t) for t in entries)


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    """PEFT's layers_to_transform: the layer index is the number after ``<layers_pattern>.`` (any
    module list when no pattern is given; the last such number in the name)."""
    patterns = config.layers_pattern
    if isinstance(patterns, str):
        patterns = [patterns]
    regexes = [rf".*\.{re.escape(p)}\.(\d+)\." for p in patterns] if patterns else [r".*\.[^.]*\.(\d+)\."]
    index = next((m for m in (re.match(r, name) for r in regexes) if m is not None), None)
    if index is None:
        return False
    layers = config.layers_to_transform
    return int(index.group(1)) in ([layers] if isinstance(layers, int) else layers)


def _pattern_value(name: str, pattern: dict[str, int], default):
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", name) or re.fullmatch(key, name):
            return value
    return default


class ModulesToSaveWrapper(nn.Module):
    """PEFT's wrapper for ``modules_to_save``: the original module plus a trainable copy per adapter.
    The active adapter's copy runs; the original runs for other adapters and when adapters are
    disabled. Attributes not found here are the original's (``lm_head.weight`` and the like)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # What runs answers: the active adapter's copy (lm_head.weight for a fused loss is the trained one).
        copies = super().__getattr__("modules_to_save")
        active = self.__dict__.get("active_adapter")
        if not self.__dict__.get("disabled", False) and active in copies:
            return getattr(copies[active], name)
        return getattr(super().__getattr__("original_module"), name)


def _modules_to_save_matches(name: str, entries: list[str] | None) -> bool:
    # PEFT's rule for modules_to_save: the module's name ends with an entry.
    return bool(entries) and any(name.endswith(entry) for entry in entries)


class LoraModel(nn.Module):
    """The wrapped model (``base_model.model`` is the user's model, as in PEFT)."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.model

    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def saved_modules(self) -> dict[str, ModulesToSaveWrapper]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if self.peft_config and any(c.bias != "none" for c in (config, *self.peft_config.values())):
            raise ValueError("LoraModel supports only one adapter with bias != 'none' (biases are shared by all "
                             "adapters); set bias='none' for every adapter to use several")
        model = self.model
        plan = _plan_adapter(model, config)
        conv1d = any(is_conv1d(m.base_layer if isinstance(m, LoraLinear) else m) for _, m, _, _ in plan.layers)
        if conv1d != config.fan_in_fan_out:  # as PEFT does: the flag follows the layers' weight layout
            logger.warning("LoraConfig: fan_in_fan_out=%s does not fit %s; setting it to %s", config.fan_in_fan_out,
                           "GPT-2's Conv1D layers" if conv1d else "nn.Linear layers", conv1d)
            config.fan_in_fan_out = conv1d
        for name, module, r, alpha in plan.layers:
            layer = module if isinstance(module, LoraLinear) else None
            if layer is None:
                layer = LoraLinear(module)
                _replace(model, name, layer)
            layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
        for name, module in plan.saved:
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
            else:
                _replace(model, name, ModulesToSaveWrapper(module, adapter_name))
        self.peft_config[adapter_name] = config
        active = self.active_adapter if self.active_adapter in self.peft_config else adapter_name
        self.active_adapter = active
        self._mark_trainable(freeze_base=True)
        self.set_adapter(active)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (its parameters train, the others' do not); a
        merged model is unmerged first, as in PEFT."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if any(layer.merged_adapters for layer in self.lora_layers().values()):
            logger.warning("set_adapter: the model holds merged adapters; unmerging them first")
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for layer in self.lora_layers().values():
            layer.active_adapters = [adapter_name] if adapter_name in layer.lora_A else []
        for wrapper in self.saved_modules().values():
            wrapper.active_adapter = adapter_name
        self._mark_trainable(freeze_base=False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for layer in self.lora_layers().values():
            layer.delete_adapter(adapter_name)
        for wrapper in self.saved_modules().values():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base model inside the block (merged adapters are unmerged first, as in PEFT)."""
        if any(layer.merged_adapters for layer in self.lora_layers().values()):
            logger.warning("disable_adapter: the model holds merged adapters; unmerging them first")
            self.unmerge_adapter()
        layers = list(self.lora_layers().values()) + list(self.saved_modules().values())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def _mark_trainable(self, freeze_base: bool) -> None:
        """The active adapter's parameters train (unless its config is in inference mode) and the
        other adapters' do not. ``freeze_base`` (when an adapter is added): every other parameter
        is frozen, then the biases the config trains are not (PEFT's rule); otherwise parameters
        outside the adapters keep whatever the user set."""
        config = self.peft_config[self.active_adapter]
        trainable = not config.inference_mode
        if freeze_base:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for _, p in _trained_biases(self.model, config):
                p.requires_grad_(trainable)
        for layer in self.lora_layers().values():
            for name in layer.lora_A:
                on = trainable and name == self.active_adapter
                layer.lora_A[name].weight.requires_grad_(on)
                layer.lora_B[name].weight.requires_grad_(on)
        for wrapper in self.saved_modules().values():
            for name, copy_ in wrapper.modules_to_save.items():
                for p in copy_.parameters():
                    p.requires_grad_(trainable and name == self.active_adapter)

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- merging --------------------------------------------------------------------------------
    def merge_adapter(self, requantize: bool = False) -> None:
        """Merge the active adapter into the base weights (``requantize=True`` lets quantized bases
        take it by quantizing the merged weight again, lossy; otherwise they raise)."""
        layers = self.lora_layers()
        quantized = [n for n, layer in layers.items() if isinstance(layer.base_layer, QuantLinear) and layer.active_adapters]
        if quantized and not requantize:  # refused before any layer changes
            raise ValueError(f"cannot merge a LoRA adapter into quantized (QuantLinear) layers exactly ({quantized[0]}"
                             f"{' and more' if len(quantized) > 1 else ''}); pass requantize=True to quantize the "
                             "merged weights again (lossy), or dequantize the model first")
        for layer in layers.values():
            layer.merge(list(layer.active_adapters), requantize=requantize)

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Merge the active adapter and put the base layers back: returns the plain model (a
        modules_to_save copy of the active adapter replaces its original)."""
        self.merge_adapter(requantize=requantize)
        model = self.model
        for name, layer in list(self.lora_layers().items()):
            _replace(model, name, layer.base_layer)
        for name, wrapper in list(self.saved_modules().items()):
            keep = wrapper.modules_to_save[self.active_adapter] if self.active_adapter in wrapper.modules_to_save \
                else wrapper.original_module
            _replace(model, name, keep)
        return model

    # ---- PEFT files -------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors of one adapter under PEFT's saved names."""
        config = self.peft_config[adapter_name]
        out = {}
        for name, layer in self.lora_layers().items():
            if adapter_name not in layer.lora_A:
                continue
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        for name, p in _trained_biases(self.model, config):
            out[PREFIX + name] = p
        for name, wrapper in self.saved_modules().items():
            if adapter_name in wrapper.modules_to_save:
                for key, t in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{PREFIX}{name}.{key}"] = t
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save_pretrained(self, directory, selected_adapters: list[str] | None = None) -> None:
        """PEFT's layout; written to a temporary folder and renamed into place per adapter."""
        from safetensors.torch import save_file

        root = pathlib.Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for adapter in selected_adapters or list(self.peft_config):
            out = root if adapter == "default" else root / adapter
            out.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
            try:
                save_file(self.adapter_state_dict(adapter), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
                config = self.peft_config[adapter].to_dict()
                config["inference_mode"] = True  # as PEFT writes it: loading for training says is_trainable=True
                (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(tmp / name, out / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    @torch.no_grad()
    def load_adapter(self, directory, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Load an adapter folder (lightllm's or PEFT's) as ``adapter_name``, frozen unless
        ``is_trainable`` (as in PEFT). Every tensor is checked against the model first; a file
        that does not fit changes nothing."""
        config, tensors, path = _read_adapter(directory)
        config.inference_mode = not is_trainable
        existing = adapter_name in self.peft_config
        targets = _check_adapter_tensors(self.model, config, tensors, path, adapter_name if existing else None)
        if not existing:
            self.add_adapter(adapter_name, config)
        _copy_adapter_tensors(self.model, tensors, targets, adapter_name)


@dataclasses.dataclass
class _AdapterPlan:
    layers: list  # (name, module to wrap or its LoraLinear, r, alpha)
    saved: list  # (name, module or its ModulesToSaveWrapper) for modules_to_save


def _plan_adapter(model: nn.Module, config: LoraConfig) -> _AdapterPlan:
    """Which layers a config wraps (with their ranks) and which modules it saves; changes nothing.
    As in PEFT, a module that modules_to_save names is saved whole and not also given LoRA, and
    exclude_modules removes matches; a matched module that LoRA cannot wrap is an error."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    saved = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    inside = tuple(name + "." for name in (*wrapped, *saved))  # submodules of a wrapper are not targets
    to_save = [(n, m) for n, m in model.named_modules()
               if (n in saved or not n.startswith(inside)) and _modules_to_save_matches(n, config.modules_to_save)]
    if config.modules_to_save and not to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matches no module of the model")
    for name, _ in to_save:
        inner = [n for n, _ in to_save if n.startswith(name + ".")]
        if inner:
            raise ValueError(f"modules_to_save names {name!r} and modules inside it ({inner[:3]})")
    saved_names = {n for n, _ in to_save}
    saved_now = tuple(n + "." for n in saved_names)
    layers, unsupported = [], []
    for name, module in model.named_modules():
        if name.startswith(inside) or name.startswith(saved_now) or name in saved_names:
            continue
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if not _matches(name, config, model, base):
            continue
        if config.exclude_modules and _names_match(name, config.exclude_modules):
            continue
        if isinstance(module, LoraLinear) or _wrappable(module):
            layers.append((name, module))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(f"target_modules={config.target_modules!r} matches {', '.join(unsupported[:3])}"
                         f"{' and more' if len(unsupported) > 3 else ''}: lightllm's LoRA wraps nn.Linear, "
                         "GPT-2's Conv1D and QuantLinear only")
    if not layers:
        raise ValueError(f"target_modules={config.target_modules!r} matches no Linear, Conv1D or QuantLinear "
                         "module of the model")
    plan = []
    for name, module in layers:
        r = _pattern_value(name, config.rank_pattern, config.r)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoraConfig: rank of {name} must be an integer >= 1, got {r!r} (rank_pattern)")
        plan.append((name, module, r, _pattern_value(name, config.alpha_pattern, config.lora_alpha)))
    return _AdapterPlan(plan, to_save)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _trained_biases(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Parameter]]:
    """The bias parameters ``config.bias`` trains (and saves), by their names in ``model``."""
    if config.bias == "none":
        return []
    wrappers = tuple(n + "." for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    lora = tuple(n + ".base_layer." for n, m in model.named_modules() if isinstance(m, LoraLinear))
    out = []
    for name, p in model.named_parameters():
        if not name.endswith("bias") or ".lora_" in name or name.startswith(wrappers):
            continue
        if config.bias == "all" or name.startswith(lora):
            out.append((name, p))
    return out


def _read_adapter(directory) -> tuple[LoraConfig, dict[str, torch.Tensor], pathlib.Path]:
    from safetensors.torch import load_file

    path = pathlib.Path(directory)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}")
    config = LoraConfig.from_dict(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}")
    return config, load_file(weights), weights


def _check_adapter_tensors(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path,
                           existing: str | None) -> dict[str, tuple[str, str, tuple]]:
    """key -> (kind, target name, expected shape) for every tensor of an adapter file, checked
    against what ``config`` makes of ``model`` (or against adapter ``existing``); raises naming the
    module and both shapes on a mismatch, a key the model has no place for, or a missing tensor."""
    expected: dict[str, tuple[str, str, tuple]] = {}
    plan = _plan_adapter(model, config)
    for name, module, r, _ in plan.layers:
        base = module.base_layer if isinstance(module, LoraLinear) else module
        k, n = base_features(base)
        if existing is not None:
            if not (isinstance(module, LoraLinear) and existing in module.lora_A):
                raise ValueError(f"{path}: the file's configuration puts LoRA on {name}, where adapter {existing!r} "
                                 "has none; load it under a new adapter name")
            r = module.lora_A[existing].weight.shape[0]
        expected[f"{PREFIX}{name}.lora_A.weight"] = ("lora_A", name, (r, k))
        expected[f"{PREFIX}{name}.lora_B.weight"] = ("lora_B", name, (n, r))
    for name, module in plan.saved:
        if existing is not None and not (isinstance(module, ModulesToSaveWrapper) and existing in module.modules_to_save):
            raise ValueError(f"{path}: the file saves {name} whole, which adapter {existing!r} does not; load it "
                             "under a new adapter name")
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, t in original.state_dict().items():
            expected[f"{PREFIX}{name}.{key}"] = ("saved", f"{name}|{key}", tuple(t.shape))
    params = dict(model.named_parameters())
    for key in tensors:
        if key in expected or ".lora_" in key or not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        bias = _find_bias(params, name)
        if bias is not None:
            expected[key] = ("bias", name, tuple(bias.shape))
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{path}: {unknown[0]} names a module the model has no adapter on"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(k for k, (kind, _, _) in expected.items() if kind in ("lora_A", "lora_B", "saved") and k not in tensors)
    if missing:
        raise ValueError(f"{path} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for key, value in tensors.items():
        kind, target, shape = expected[key]
        if tuple(value.shape) != shape:
            where = target.split("|")[0]
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but {where} needs {shape}")
    return expected


def _find_bias(params: dict[str, nn.Parameter], name: str) -> nn.Parameter | None:
    """A bias parameter by its saved name: PEFT saves a wrapped layer's bias as
    ``<layer>.base_layer.bias``, which is ``<layer>.bias`` before the layer is wrapped."""
    if not name.endswith("bias"):
        return None
    for candidate in (name, name.replace(".base_layer.bias", ".bias"), name[: -len("bias")] + "base_layer.bias"):
        if candidate in params:
            return params[candidate]
    return None


def _copy_adapter_tensors(model: nn.Module, tensors, targets, adapter_name: str) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        kind, target, _ = targets[key]
        if kind in ("lora_A", "lora_B"):
            dest = getattr(layers[target], kind)[adapter_name].weight
        elif kind == "saved":
            name, sub = target.split("|")
            dest = wrappers[name].modules_to_save[adapter_name].state_dict(keep_vars=True)[sub]
        else:
            dest = _find_bias(params, target)
        dest.copy_(value.to(dest.dtype))


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model``'s matching layers with LoRA adapters (in place); returns the PEFT-style wrapper."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    return LoraModel(model, config, adapter_name)


@torch.no_grad()
def from_pretrained(model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False) -> LoraModel:
    """Load an adapter saved by lightllm or PEFT onto ``model``, frozen unless ``is_trainable``
    (PEFT's ``PeftModel.from_pretrained``). The file is checked against the model before the model
    is wrapped: a file that does not fit leaves the model as it was."""
    config, tensors, path = _read_adapter(directory)
    config.inference_mode = not is_trainable
    targets = _check_adapter_tensors(model, config, tensors, path, None)
    wrapped = get_peft_model(model, config, adapter_name)
    _copy_adapter_tensors(wrapped.model, tensors, targets, adapter_name)
    return wrapped
