"""The tuner base every method shares: the PEFT-style model wrapper and its adapters' lifecycle.

``TunerModel`` wraps a user's model in place (``base_model.model`` is that model, as in PEFT):
it finds the targets of a config (PEFT's matching rules), wraps each in the method's
:class:`~lightllm.tuning.layers.TunerLayer`, keeps ``modules_to_save`` copies, marks what trains,
manages named adapters (add / set / delete / disable), counts parameters, and writes and reads
adapter folders with every tensor checked against the model first. A method subclasses it and
fills in a few hooks: what to add to a wrapped layer, which tensors an adapter saves and how a
file's tensors go back in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import pathlib
import types
from typing import Any, ClassVar

import torch
from torch import nn

from .config import TunerConfig, modules_to_save_matches, target_matches
from .layers import TunerLayer, base_layer_kind, supported_base_layers
from .save_load import check_tensors, json_writer, read_json, read_tensors, tensors_writer, write_files_atomically

logger = logging.getLogger("lightllm")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_UNSET = object()


def mirror_forward_signature(wrapper: nn.Module, inner: nn.Module) -> None:
    """Give ``wrapper.forward`` the signature of ``inner.forward`` (for ``inspect.signature``).

    transformers' ``Trainer`` keeps only the dataset columns that ``model.forward`` names (its
    default ``remove_unused_columns=True``), so a pass-through ``forward(*args, **kwargs)`` would
    leave it nothing. The wrapper's own forward still runs; only what introspection sees changes:
    the instance gets a copy of its class's forward function carrying ``__signature__`` (the
    inner model's parameters behind ``self``), bound to it. Nothing happens when the inner
    forward has no readable signature."""
    try:
        params = list(inspect.signature(inner.forward).parameters.values())
    except (TypeError, ValueError):
        return
    cls_forward = type(wrapper).forward
    fn = types.FunctionType(cls_forward.__code__, cls_forward.__globals__, cls_forward.__name__,
                            cls_forward.__defaults__, cls_forward.__closure__)
    fn.__kwdefaults__ = cls_forward.__kwdefaults__
    fn.__qualname__ = cls_forward.__qualname__
    fn.__doc__ = cls_forward.__doc__
    fn.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                          *params])
    # object.__setattr__: a plain instance attribute (what nn.Module.__call__ reads as self.forward).
    object.__setattr__(wrapper, "forward", types.MethodType(fn, wrapper))


def _tensors(module: nn.Module):
    return [*module.parameters(), *module.buffers()]


def _forgive_missing_base_keys(module: "AdapterStateDict", incompatible_keys) -> None:
    """load_state_dict post-hook: the frozen base tensors that ``state_dict`` leaves out are not
    missing (a strict load of the wrapper's own state_dict succeeds)."""
    base = module.base_state_keys()
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if not any(k == b or k.endswith("." + b) for b in base)]


class AdapterStateDict:
    """Mixin for the tuning wrappers: ``state_dict()`` holds the adapters, not the frozen base model.

    A wrapper's weights of record are its adapters (``save_pretrained`` writes those); the base
    model comes from its own checkpoint. ``state_dict()`` therefore keeps the adapters' tensors
    (every named adapter, ``modules_to_save`` copies, trained biases) and any parameter that
    trains, and leaves out the frozen base. This is what transformers' ``Trainer`` saves for a
    model that is not a ``PreTrainedModel`` (``model.safetensors`` of ``state_dict()``) and loads
    back on ``resume_from_checkpoint`` and ``load_best_model_at_end`` (``load_state_dict(...,
    strict=False)``): a checkpoint is the adapter's size, and tied base weights (which safetensors
    refuses to write twice) are not in it. ``load_state_dict`` accepts such a dict strictly, and
    still takes a whole model's dict. ``base_model.model.state_dict()`` is the base model's own."""

    def adapter_tensor_ids(self) -> set[int]:
        raise NotImplementedError

    def _state_names(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]

    def adapter_state_keys(self) -> set[str]:
        """Names (relative to this wrapper) of the tensors ``state_dict`` keeps."""
        keep = self.adapter_tensor_ids() | {id(p) for p in self.parameters() if p.requires_grad}
        return {n for n, t in self._state_names() if id(t) in keep}

    def base_state_keys(self) -> set[str]:
        keep = self.adapter_state_keys()
        return {n for n, _ in self._state_names() if n not in keep}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        base = self.base_state_keys()
        for key in [k for k in out if k.startswith(prefix) and k[len(prefix):] in base]:
            del out[key]
        return out


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


@dataclasses.dataclass
class TargetPlan:
    """What a config does to a model, decided before anything changes."""

    layers: list  # (name, module to wrap or its TunerLayer, per-layer info from the method)
    saved: list  # (name, module or its ModulesToSaveWrapper) for modules_to_save


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class BaseModelHolder(nn.Module):
    """``wrapper.base_model``: holds the user's model as ``.model`` (PEFT's key layout,
    ``base_model.model.<module>``). Called, it runs that model's backbone (transformers'
    ``base_model``: the decoder stack without the LM head, whose layers carry the adapters), which
    is what TRL's fused LM head calls on the model it patches (``model.base_model(...)``, then the
    output embeddings' weight on the hidden states); a model without a separate backbone runs whole."""

    def forward(self, *args, **kwargs):
        inner = self.model
        backbone = getattr(inner, "base_model", inner)
        return (backbone if isinstance(backbone, nn.Module) else inner)(*args, **kwargs)


class TunerModel(AdapterStateDict, nn.Module):
    """The wrapped model of one tuning method (``base_model.model`` is the user's model)."""

    layer_type: ClassVar[type[TunerLayer]] = TunerLayer
    config_type: ClassVar[type[TunerConfig]] = TunerConfig
    method_name: ClassVar[str] = "adapter"
    # The config.bias value that trains the wrapped layers' own biases ("lora_only", "adapter_only").
    layer_bias_value: ClassVar[str] = ""

    def __init__(self, model: nn.Module, config: TunerConfig | None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = BaseModelHolder()
        self.base_model.model = model
        self.peft_config: dict[str, TunerConfig] = {}
        self.active_adapter = adapter_name
        mirror_forward_signature(self, model)
        self.register_load_state_dict_post_hook(_forgive_missing_base_keys)
        if config is not None:  # None: a wrapper without adapters yet (files are checked before the first)
            self.add_adapter(adapter_name, config)

    def __setstate__(self, state):
        super().__setstate__(state)
        mirror_forward_signature(self, self.base_model.model)  # a pickled bound method comes back unsigned

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, labels=_UNSET, **kwargs):
        """The wrapped model's forward (each instance's ``forward`` carries that model's signature:
        :func:`mirror_forward_signature`). ``labels`` is named so that transformers' ``Trainer``,
        which reads the label names off the class, finds them and reports an evaluation loss."""
        if labels is not _UNSET:
            kwargs["labels"] = labels
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """The base model's, and (unless ``use_reentrant=False``) its input embeddings' output made to
        require grad, as peft does: reentrant checkpointing (transformers 4.x's default, which the
        Trainer passes on) gives a checkpointed block whose inputs do not require grad no backward,
        so adapters on a frozen base would get no gradient."""
        base = self.base_model.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", True) and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def adapter_tensor_ids(self) -> set[int]:
        """Every adapter's tensors (all named adapters), modules_to_save copies and trained biases;
        a wrapper stacked inside (prompt learning over LoRA and the like) adds its own."""
        ids: set[int] = set()
        for layer in self.tuner_layers().values():
            for attr in layer.adapter_module_names:
                ids.update(id(t) for t in _tensors(getattr(layer, attr)))
        for wrapper in self.saved_modules().values():
            ids.update(id(t) for t in _tensors(wrapper.modules_to_save))
        for config in self.peft_config.values():
            ids.update(id(p) for _, p in self.trained_biases(config))
        inner = self.model
        if isinstance(inner, AdapterStateDict):
            ids |= inner.adapter_tensor_ids()
        return ids

    def tuner_layers(self) -> dict[str, TunerLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, self.layer_type)}

    def saved_modules(self) -> dict[str, ModulesToSaveWrapper]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    # ---- hooks for the methods ------------------------------------------------------------------
    def _prepare_config(self, config: TunerConfig) -> TunerConfig:
        """The config with anything the model decides filled in (defaults per model type)."""
        return config

    def _check_new_adapter(self, adapter_name: str, config: TunerConfig) -> None:
        """Refuse a config that cannot join the adapters already there."""

    def _layer_info(self, name: str, module: nn.Module, config: TunerConfig) -> Any:
        """Per-layer settings of a target (LoRA: its rank and alpha); raise on a bad one."""
        return None

    def _add_to_layer(self, layer: TunerLayer, adapter_name: str, config: TunerConfig, info: Any, name: str) -> None:
        raise NotImplementedError

    def _layer_state(self, name: str, layer: TunerLayer, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved tensors of one wrapped layer for ``adapter_name``, keyed by their saved names."""
        raise NotImplementedError

    def _expected_layer_tensors(self, name: str, module: nn.Module, info: Any, config: TunerConfig,
                                existing: str | None, path) -> dict[str, tuple[str, str, tuple]]:
        """key -> (kind, layer name, shape) of the tensors a file holds for one target layer."""
        raise NotImplementedError

    def _optional_layer_tensors(self, expected: dict[str, tuple[str, str, tuple]]) -> set[str]:
        """Keys of ``expected`` a file may leave out."""
        return set()

    def _copy_layer_tensor(self, layer: TunerLayer, kind: str, adapter_name: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    # ---- planning -----------------------------------------------------------------------------
    def _plan(self, config: TunerConfig) -> TargetPlan:
        """Which layers a config wraps and which modules it saves; changes nothing. As in PEFT, a
        module that modules_to_save names is saved whole and not also given an adapter, and
        exclude_modules removes matches; a matched module that cannot be wrapped is an error."""
        model = self.model
        wrapped = {n: m for n, m in model.named_modules() if isinstance(m, TunerLayer)}
        saved = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        inside = tuple(name + "." for name in (*wrapped, *saved))  # submodules of a wrapper are not targets
        to_save = [(n, m) for n, m in model.named_modules()
                   if (n in saved or not n.startswith(inside)) and modules_to_save_matches(n, config.modules_to_save)]
        if config.modules_to_save and not to_save:
            raise ValueError(f"modules_to_save={config.modules_to_save!r} matches no module of the model")
        for name, _ in to_save:
            inner = [n for n, _ in to_save if n.startswith(name + ".")]
            if inner:
                raise ValueError(f"modules_to_save names {name!r} and modules inside it ({inner[:3]})")
        saved_names = {n for n, _ in to_save}
        saved_now = tuple(n + "." for n in saved_names)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = head.original_module if isinstance(head, ModulesToSaveWrapper) else head
        layers, unsupported = [], []
        for name, module in model.named_modules():
            if name.startswith(inside) or name.startswith(saved_now) or name in saved_names:
                continue
            if isinstance(module, TunerLayer) and not isinstance(module, self.layer_type):
                continue  # another method's layer: its base is not ours to wrap again
            base = module.base_layer if isinstance(module, TunerLayer) else module
            wrappable = base_layer_kind(base) is not None
            if not target_matches(name, config, base is head, wrappable):
                continue
            if wrappable:
                layers.append((name, module))
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
        if unsupported:
            raise ValueError(f"target_modules={config.target_modules!r} matches {', '.join(unsupported[:3])}"
                             f"{' and more' if len(unsupported) > 3 else ''}: lightllm's {self.method_name} wraps "
                             f"{supported_base_layers()} only")
        if not layers:
            raise ValueError(f"target_modules={config.target_modules!r} matches no Linear layer of the model "
                             f"(lightllm's {self.method_name} wraps {supported_base_layers()})")
        return TargetPlan([(n, m, self._layer_info(n, m, config)) for n, m in layers], to_save)

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: TunerConfig) -> None:
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__} takes a {self.config_type.__name__}, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = self._prepare_config(config)
        self._check_new_adapter(adapter_name, config)
        plan = self._plan(config)
        model = self.model
        for name, module, info in plan.layers:
            layer = module if isinstance(module, self.layer_type) else None
            if layer is None:
                layer = self.layer_type(module)
                replace_module(model, name, layer)
            self._add_to_layer(layer, adapter_name, config, info, name)
            layer.train(layer.base_layer.training)  # new dropout modules follow the model's mode (eval stays eval)
        for name, module in plan.saved:
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
            else:
                module = ModulesToSaveWrapper(module, adapter_name)
                replace_module(model, name, module)
            module.train(module.original_module.training)
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
        if any(layer.merged_adapters for layer in self.tuner_layers().values()):
            logger.warning("set_adapter: the model holds merged adapters; unmerging them first")
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for layer in self.tuner_layers().values():
            layer.set_active([adapter_name])
        for wrapper in self.saved_modules().values():
            wrapper.active_adapter = adapter_name
        self._mark_trainable(freeze_base=False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for layer in self.tuner_layers().values():
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
        if any(layer.merged_adapters for layer in self.tuner_layers().values()):
            logger.warning("disable_adapter: the model holds merged adapters; unmerging them first")
            self.unmerge_adapter()
        layers = list(self.tuner_layers().values()) + list(self.saved_modules().values())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def trained_biases(self, config: TunerConfig) -> list[tuple[str, nn.Parameter]]:
        """The bias parameters ``config.bias`` trains (and saves), by their names in the model:
        "all" every bias, the method's layer value (``lora_only``, ``adapter_only``) the wrapped
        layers' own biases."""
        bias = getattr(config, "bias", "none")
        if bias == "none":
            return []
        model = self.model
        wrappers = tuple(n + "." for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
        own = tuple(n + ".base_layer." for n, m in model.named_modules() if isinstance(m, self.layer_type))
        adapter_params = {id(p) for layer in self.tuner_layers().values() for name in layer.adapter_names()
                          for p in layer.adapter_parameters(name)}
        out = []
        for name, p in model.named_parameters():
            if not name.endswith("bias") or id(p) in adapter_params or name.startswith(wrappers):
                continue
            if bias == "all" or name.startswith(own):
                out.append((name, p))
        return out

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
            for _, p in self.trained_biases(config):
                p.requires_grad_(trainable)
        for layer in self.tuner_layers().values():
            for name in layer.adapter_names():
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(trainable and name == self.active_adapter)
        for wrapper in self.saved_modules().values():
            for name, copy_ in wrapper.modules_to_save.items():
                for p in copy_.parameters():
                    p.requires_grad_(trainable and name == self.active_adapter)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        quantized = any(base_layer_kind(m) is not None and base_layer_kind(m).quantized for m in self.model.modules())
        note = " (quantized layers counted at their logical size, in x out)" if quantized else ""
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
              f"{note}")

    # ---- merging --------------------------------------------------------------------------------
    def merge_adapter(self, requantize: bool = False) -> None:
        raise ValueError(f"{self.method_name} adapters cannot be merged into the base weights")

    def unmerge_adapter(self) -> None:
        for layer in self.tuner_layers().values():
            layer.unmerge()

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Merge the active adapter and put the base layers back: returns the plain model (a
        modules_to_save copy of the active adapter replaces its original)."""
        self.merge_adapter(requantize=requantize)
        return self._unwrap(keep_saved_copies=True)

    def unload(self) -> nn.Module:
        """The base model without any adapter (nothing merged; modules_to_save originals back)."""
        if any(layer.merged_adapters for layer in self.tuner_layers().values()):
            self.unmerge_adapter()
        return self._unwrap(keep_saved_copies=False)

    def _unwrap(self, keep_saved_copies: bool) -> nn.Module:
        model = self.model
        for name, layer in list(self.tuner_layers().items()):
            self._release_layer(layer)
            replace_module(model, name, layer.base_layer)
        for name, wrapper in list(self.saved_modules().items()):
            keep = wrapper.original_module
            if keep_saved_copies and self.active_adapter in wrapper.modules_to_save:
                keep = wrapper.modules_to_save[self.active_adapter]
            replace_module(model, name, keep)
        return model

    def _release_layer(self, layer: TunerLayer) -> None:
        """Undo what wrapping a layer set up outside it (hooks on other modules)."""

    # ---- files ----------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors of one adapter under PEFT's saved names (``base_model.model.<module>...``)."""
        config = self.peft_config[adapter_name]
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.tuner_layers().items():
            if adapter_name in layer.adapter_names():
                out.update(self._layer_state(name, layer, adapter_name))
        for name, p in self.trained_biases(config):
            out[PREFIX + name] = p
        for name, wrapper in self.saved_modules().items():
            if adapter_name in wrapper.modules_to_save:
                for key, t in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{PREFIX}{name}.{key}"] = t
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def _config_to_save(self, adapter_name: str) -> dict[str, Any]:
        config = self.peft_config[adapter_name].to_dict()
        config["inference_mode"] = True  # as PEFT writes it: loading for training says is_trainable=True
        return config

    def save_pretrained(self, directory, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True) -> None:
        """PEFT's layout (adapter_config.json + adapter_model.safetensors, or adapter_model.bin with
        ``safe_serialization=False``); adapters other than "default" in a sub-folder of their name.
        Each folder's files are written to a temporary folder and renamed into place."""
        root = pathlib.Path(directory)
        for adapter in selected_adapters or list(self.peft_config):
            if adapter not in self.peft_config:
                raise ValueError(f"no adapter named {adapter!r}; adapters: {sorted(self.peft_config)}")
            out = root if adapter == "default" else root / adapter
            weights = WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME
            write_files_atomically(out, {
                weights: tensors_writer(self.adapter_state_dict(adapter), safe_serialization),
                CONFIG_NAME: json_writer(self._config_to_save(adapter)),
            })

    def expected_tensors(self, config: TunerConfig, tensors: dict[str, torch.Tensor], path,
                         existing: str | None) -> dict[str, tuple[str, str, tuple]]:
        """key -> (kind, target, expected shape) for every tensor of an adapter file, checked
        against what ``config`` makes of the model (or against adapter ``existing``); raises naming
        the module and both shapes on a mismatch, a key the model has no place for, or a missing
        tensor."""
        expected: dict[str, tuple[str, str, tuple]] = {}
        plan = self._plan(config)
        for name, module, info in plan.layers:
            expected.update(self._expected_layer_tensors(name, module, info, config, existing, path))
        for name, module in plan.saved:
            if existing is not None and not (isinstance(module, ModulesToSaveWrapper)
                                             and existing in module.modules_to_save):
                raise ValueError(f"{path}: the file saves {name} whole, which adapter {existing!r} does not; load it "
                                 "under a new adapter name")
            original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            for key, t in original.state_dict().items():
                expected[f"{PREFIX}{name}.{key}"] = ("saved", f"{name}|{key}", tuple(t.shape))
        params = dict(self.model.named_parameters())
        for key in tensors:
            if key in expected or not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            bias = _find_bias(params, name)
            if bias is not None:
                expected[key] = ("bias", name, tuple(bias.shape))
        required = {k for k, (kind, _, _) in expected.items() if kind != "bias"}
        optional = (set(expected) - required) | self._optional_layer_tensors(expected)
        check_tensors({k: (target.split("|")[0], shape) for k, (_, target, shape) in expected.items()},
                      tensors, path, optional, floating={k for k, (kind, _, _) in expected.items() if kind != "saved"})
        return expected

    def copy_tensors(self, tensors: dict[str, torch.Tensor], targets, adapter_name: str) -> None:
        layers = self.tuner_layers()
        wrappers = self.saved_modules()
        params = dict(self.model.named_parameters())
        for key, value in tensors.items():
            kind, target, _ = targets[key]
            if kind == "saved":
                name, sub = target.split("|")
                dest = wrappers[name].modules_to_save[adapter_name].state_dict(keep_vars=True)[sub]
                dest.copy_(value.to(dest.dtype))
            elif kind == "bias":
                dest = _find_bias(params, target)
                dest.copy_(value.to(dest.dtype))
            else:
                self._copy_layer_tensor(layers[target], kind, adapter_name, value)

    @torch.no_grad()
    def load_adapter(self, directory, adapter_name: str = "default", is_trainable: bool = False, *,
                     revision: str | None = None, subfolder: str | None = None) -> None:
        """Load an adapter folder (or hub id, at ``revision``, with ``subfolder``) as ``adapter_name``,
        frozen unless ``is_trainable`` (as in PEFT). Every tensor is checked against the model first;
        a file that does not fit changes nothing."""
        from ..hub import resolve_folder

        config, tensors, path = self.read_adapter(resolve_folder(directory, revision, subfolder, what="adapter"))
        config.inference_mode = not is_trainable
        existing = adapter_name in self.peft_config
        config = self._prepare_config(config)
        targets = self.expected_tensors(config, tensors, path, adapter_name if existing else None)
        if not existing:
            self.add_adapter(adapter_name, config)
        self.copy_tensors(tensors, targets, adapter_name)

    @classmethod
    @torch.no_grad()
    def from_pretrained(cls, model: nn.Module, config: TunerConfig, tensors: dict[str, torch.Tensor], path,
                        adapter_name: str = "default", is_trainable: bool = False) -> "TunerModel":
        """Wrap ``model`` with an adapter read from a file (``config`` and ``tensors``, keys in
        PEFT's layout), frozen unless ``is_trainable``. Every tensor is checked against the model
        before the model is wrapped: a file that does not fit leaves the model as it was."""
        config.inference_mode = not is_trainable
        wrapper = cls(model, None, adapter_name)
        config = wrapper._prepare_config(config)
        targets = wrapper.expected_tensors(config, tensors, path, None)
        wrapper.add_adapter(adapter_name, config)
        wrapper.copy_tensors(tensors, targets, adapter_name)
        return wrapper

    @classmethod
    def read_adapter(cls, directory) -> tuple[TunerConfig, dict[str, torch.Tensor], pathlib.Path]:
        """(config, tensors, weights path) of a PEFT-layout adapter folder of this method."""
        path = pathlib.Path(directory)
        config = cls.config_type.from_dict(read_json(path / CONFIG_NAME))
        tensors, weights = read_tensors(path, (WEIGHTS_NAME, BIN_WEIGHTS_NAME))
        return config, tensors, weights


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters. A quantized base layer holds its weight packed (buffers, not
    parameters): it counts as in_features x out_features (+ bias), its logical size, so that "all"
    means the same number with and without quantization (PEFT counts packed 4-bit parameters twice
    instead)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        kind = base_layer_kind(module)
        if kind is not None and kind.logical_weight_numel is not None:
            total += kind.logical_weight_numel(module) - sum(p.numel() for p in module.parameters(recurse=False))
    return trainable, total


def _find_bias(params: dict[str, nn.Parameter], name: str) -> nn.Parameter | None:
    """A bias parameter by its saved name: PEFT saves a wrapped layer's bias as
    ``<layer>.base_layer.bias``, which is ``<layer>.bias`` before the layer is wrapped."""
    if not name.endswith("bias"):
        return None
    for candidate in (name, name.replace(".base_layer.bias", ".bias"), name[: -len("bias")] + "base_layer.bias"):
        if candidate in params:
            return params[candidate]
    return None
