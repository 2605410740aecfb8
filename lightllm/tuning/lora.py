"""LoRA adapters with PEFT's configuration, module layout and files.

``get_peft_model(model, LoraConfig(...))`` wraps every matching layer (nn.Linear, transformers'
GPT-2 Conv1D, lightllm's QuantLinear) in a :class:`LoraLinear`:
``y = base(x) + scaling * lora_B(lora_A(dropout(x)))``, scaling = lora_alpha / r (or / sqrt(r) with
rsLoRA), A initialized like nn.Linear (Kaiming-uniform, a = sqrt(5)) and B with zeros, so a new
adapter changes nothing. Only adapter parameters train (plus what ``bias`` / ``modules_to_save``
ask for). Files are PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (adapter name removed); adapters other than "default"
in a sub-folder of their name.

On a QuantLinear base at inference (no gradient needed) the rank-r term rides in the dequant-matmul
kernel's epilogue (``lightllm::gptq_matmul``'s ``lora_s``/``lora_b``), so the packed weight is read
once. Training takes the plain path (autograd through the base op and the two small matmuls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("lightllm")

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

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
}


@dataclasses.dataclass
class LoraConfig:
    """PEFT's LoraConfig fields and defaults (the ones lightllm implements)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
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


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a GPT-2 Conv1D or a QuantLinear."""
    if isinstance(base, (nn.Linear, QuantLinear)):
        return base.in_features, base.out_features
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"LoRA wraps nn.Linear, Conv1D or QuantLinear, not {type(base).__name__}")


class LoraLinear(nn.Module):
    """A base layer plus named low-rank adapters (PEFT's layout: ``base_layer``, ``lora_A.<name>``,
    ``lora_B.<name>``, ``lora_dropout.<name>``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.in_features, self.out_features = _features(base_layer)
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        weight = self._base_weight_like()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init is False:  # PEFT: random B too (for tests of non-trivial adapters)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.normal_(self.lora_B[name].weight, std=1.0 / r)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        if name not in self.active_adapters:
            self.active_adapters = [name]

    def _base_weight_like(self) -> torch.Tensor:
        b = self.base_layer
        return b.scales if isinstance(b, QuantLinear) else b.weight

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, as [out_features, in_features] in float32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = [] if self.disabled else [a for a in self.active_adapters if a not in self.merged_adapters]
        base = self.base_layer
        if self.disabled and self.merged_adapters:
            raise RuntimeError("adapters are merged into the base weight; unmerge them to disable them")
        # Inference on a quantized base with one adapter: the rank-r term in the kernel's epilogue.
        if (len(adapters) == 1 and isinstance(base, QuantLinear) and not torch.is_grad_enabled()
                and isinstance(self.lora_dropout[adapters[0]], nn.Identity)):
            name = adapters[0]
            s = x.reshape(-1, self.in_features).float() @ self.lora_A[name].weight.float().t()
            return base.forward_with_lora(x, s, self.lora_B[name].weight, self.scaling[name])
        y = base(x)
        for name in adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            lora = b(a(self.lora_dropout[name](x).to(a.weight.dtype)))
            y = y + (self.scaling[name] * lora).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        if isinstance(self.base_layer, QuantLinear):
            raise ValueError("cannot merge a LoRA adapter into a quantized (QuantLinear) base without requantizing; "
                             "dequantize the model first")
        for name in names:
            if name in self.merged_adapters:
                continue
            delta = self.delta_weight(name)
            w = self.base_layer.weight
            w.add_((delta.t() if _is_conv1d(self.base_layer) else delta).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            w = self.base_layer.weight
            w.sub_((delta.t() if _is_conv1d(self.base_layer) else delta).to(w.dtype))

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A.keys())}, active={self.active_adapters}"


def _matches(name: str, config: LoraConfig, model: nn.Module, module: nn.Module) -> bool:
    """PEFT's target_modules rules: a list matches a module whose name equals an entry or ends with
    '.' + entry; a string is a full regex match; 'all-linear' is every Linear except the output head."""
    targets = config.target_modules
    if targets is None:
        raise ValueError("LoraConfig.target_modules is required (a list of module names, a regex, or 'all-linear')")
    if targets == "all-linear":
        if not isinstance(module, (nn.Linear, QuantLinear)) and not _is_conv1d(module):
            return False
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return module is not head
    if isinstance(targets, str):
        matched = re.fullmatch(targets, name) is not None
    else:
        matched = any(name == t or name.endswith("." + t) for t in targets)
    if matched and config.layers_to_transform is not None:
        layers = [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform
        index = re.search(r"\.(\d+)\.", "." + name + ".")
        matched = index is not None and int(index.group(1)) in layers
    return matched


def _pattern_value(name: str, pattern: dict[str, int], default):
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", name) or re.fullmatch(key, name):
            return value
    return default


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

    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        model = self.model
        wrapped = self.lora_layers()
        inside = tuple(name + "." for name in wrapped)  # a wrapped layer's own submodules
        targets = [(n, m) for n, m in model.named_modules()
                   if not isinstance(m, LoraLinear) and not n.startswith(inside)
                   and (isinstance(m, (nn.Linear, QuantLinear)) or _is_conv1d(m)) and _matches(n, config, model, m)]
        targets += [(n, m.base_layer) for n, m in wrapped.items() if _matches(n, config, model, m.base_layer)]
        if not targets:
            raise ValueError(f"target_modules={config.target_modules!r} matches no Linear, Conv1D or QuantLinear "
                             "module of the model")
        for name, module in targets:
            layer = wrapped.get(name)
            if layer is None:
                layer = LoraLinear(module)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer)
            r = _pattern_value(name, config.rank_pattern, config.r)
            alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha)
            layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for layer in self.lora_layers().values():
            layer.active_adapters = [adapter_name] if adapter_name in layer.lora_A else []
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for layer in self.lora_layers().values():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        layers = self.lora_layers().values()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def _mark_trainable(self) -> None:
        config = self.peft_config[self.active_adapter]
        for name, p in self.model.named_parameters():
            p.requires_grad_(False)
        for layer in self.lora_layers().values():
            if self.active_adapter in layer.lora_A:
                for p in (layer.lora_A[self.active_adapter].weight, layer.lora_B[self.active_adapter].weight):
                    p.requires_grad_(not config.inference_mode)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                if isinstance(layer.base_layer.bias, nn.Parameter):
                    layer.base_layer.bias.requires_grad_(True)
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        for name, module in self.model.named_modules():
            if config.modules_to_save and any(name == m or name.endswith("." + m) for m in config.modules_to_save):
                for p in module.parameters():
                    p.requires_grad_(True)

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def merge_adapter(self) -> None:
        for layer in self.lora_layers().values():
            layer.merge([a for a in layer.active_adapters])

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and put the base layers back: returns the plain model."""
        self.merge_adapter()
        model = self.model
        for name, layer in list(self.lora_layers().items()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
        return model

    # ---- PEFT files -------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors of one adapter under PEFT's saved names."""
        out = {}
        for name, layer in self.lora_layers().items():
            if adapter_name not in layer.lora_A:
                continue
            key = f"base_model.model.{name}"
            out[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
            out[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
        return out

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
                (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(tmp / name, out / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    @torch.no_grad()
    def load_adapter(self, directory, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        path = pathlib.Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}")
        config = LoraConfig.from_dict(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")))
        weights_path = path / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}")
        tensors = load_file(weights_path)
        if adapter_name not in self.peft_config:
            self.add_adapter(adapter_name, config)
        layers = self.lora_layers()
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{weights_path} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        for key, value in tensors.items():
            module_path, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            layer = layers.get(module_path)
            if layer is None or adapter_name not in layer.lora_A:
                raise ValueError(f"{weights_path}: {key} names a module the model has no adapter on")
            target = (layer.lora_A if part.startswith("A") else layer.lora_B)[adapter_name].weight
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{weights_path}: {key} has shape {tuple(value.shape)} but {module_path} needs "
                                 f"{tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model``'s matching layers with LoRA adapters (in place); returns the PEFT-style wrapper."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    return LoraModel(model, config, adapter_name)


def from_pretrained(model: nn.Module, directory, adapter_name: str = "default") -> LoraModel:
    """Load an adapter saved by lightllm or PEFT onto ``model``."""
    path = pathlib.Path(directory)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}")
    config = LoraConfig.from_dict(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")))
    wrapped = get_peft_model(model, config, adapter_name)
    wrapped.load_adapter(path, adapter_name)
    return wrapped
