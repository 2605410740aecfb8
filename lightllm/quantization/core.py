"""The quantization API every method shares: ``quantize_(model, config)``.

A method is a config class registered here under its name (``gptq`` and ``rtn`` in
:mod:`lightllm.quantization.gptq`, ``nf4``, ``fp4`` and ``int8`` in
:mod:`lightllm.quantization.bnb`), and under the ``quant_method`` its checkpoints carry, so that
:func:`config_from_dict` turns any checkpoint's ``quantization_config`` back into a config.

Every method goes through the same walk: :func:`quantization_units` finds the Linear layers to
quantize, grouped by transformer block (the largest ``nn.ModuleList`` of identical blocks), and
:func:`replace_module` swaps each for its quantized layer. Methods that need no data (round to
nearest, NF4/FP4, LLM.int8) build each layer from its weight alone (``config.make_layer``);
calibrated ones (GPTQ) run the block walk with activations (``config.quantize_calibrated``) and
replace layers through the same routine.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger("lightllm")

DEFAULT_SKIP = r"(^|\.)lm_head$"


class QuantizationConfig:
    """What every method's config provides (mixed into each method's dataclass).

    ``method``: the registry name. ``quant_method``: what the checkpoint's ``quantization_config``
    says. ``needs_calibration``: the method reads activations (``quantize_`` then wants data).
    ``blocks_only``: quantize the Linears inside the transformer blocks only (AutoGPTQ's choice);
    otherwise every Linear but those :meth:`skip_pattern` matches (transformers' choice for
    bitsandbytes), on any model, block list or not.
    """

    quant_method: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    blocks_only: ClassVar[bool] = True

    def skip_pattern(self) -> str | None:
        """A regex on qualified module names that stay dense (the output head by default)."""
        return DEFAULT_SKIP

    def unsupported(self, out_features: int, in_features: int) -> str | None:
        """Why a weight of this shape cannot be stored in the format (None: it can)."""
        return None

    def make_layer(self, linear: nn.Linear) -> nn.Module:
        """The quantized replacement of ``linear`` from its weight alone."""
        raise NotImplementedError(f"{type(self).__name__} needs calibration data: use quantize_(model, config, data)")

    def quantize_calibrated(self, model: nn.Module, units: list["QuantizationUnit"], calibration,
                            progress: bool, residency: "Residency | None" = None) -> int:
        """Quantize every unit's layers using ``calibration``, each unit between
        ``residency.load(unit)`` and ``residency.release(unit)``; the count replaced."""
        raise NotImplementedError

    @classmethod
    def layer_types(cls) -> tuple[type, ...]:
        """Every module class this method's layers can be."""
        raise NotImplementedError

    @property
    def layer_type(self) -> type:
        """The module class this config's layers are (what its checkpoints hold)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


# ---- registry ----------------------------------------------------------------------------------

_METHODS: dict[str, type] = {}
_FORMATS: dict[str, Callable[[dict[str, Any]], QuantizationConfig]] = {}


def register_method(name: str):
    """Class decorator: ``make_config(name, **fields)`` and ``lightllm quantize --method name`` build it."""
    def wrap(cls):
        if not issubclass(cls, QuantizationConfig):
            raise TypeError(f"{cls.__name__} must subclass QuantizationConfig")
        _METHODS[name] = cls
        return cls
    return wrap


def register_format(quant_method: str, parse: Callable[[dict[str, Any]], QuantizationConfig]) -> None:
    """How a checkpoint whose ``quantization_config`` has this ``quant_method`` becomes a config."""
    _FORMATS[quant_method] = parse


def methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def config_class(method: str) -> type:
    try:
        return _METHODS[method]
    except KeyError:
        raise ValueError(f"unknown quantization method {method!r}; registered: {', '.join(_METHODS)}") from None


def make_config(method: str, **fields) -> QuantizationConfig:
    """``make_config("gptq", bits=4, group_size=128)``, ``make_config("nf4")``, ..."""
    return config_class(method)(**fields)


def config_from_dict(quant: dict[str, Any]) -> QuantizationConfig:
    """A checkpoint's ``quantization_config`` (``quant_method`` gptq when absent, as AutoGPTQ's
    ``quantize_config.json`` omits it) as the config of the method that wrote it."""
    quant_method = str(quant.get("quant_method", "gptq")).lower()
    try:
        parse = _FORMATS[quant_method]
    except KeyError:
        raise ValueError(f"quant_method {quant_method!r} is not supported; lightllm reads "
                         f"{', '.join(repr(m) for m in _FORMATS)}") from None
    return parse(quant)


# ---- the walk ----------------------------------------------------------------------------------

class LayerListNotFoundError(ValueError):
    """The model has no recognisable list of transformer blocks."""


def is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (found by name: transformers is optional), a Linear stored [in, out]
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
                                             and getattr(module, "weight", None) is not None
                                             and module.weight.dim() == 2)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """[out_features, in_features] (GPT-2's Conv1D stores the transpose)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself for an nn.Linear; for a Conv1D an nn.Linear sharing its (transposed) weight."""
    if isinstance(module, nn.Linear):
        return module
    weight = linear_weight(module).detach()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: ``(qualified name, ModuleList)``.

    The largest ``nn.ModuleList`` (by parameter count) whose children all have one type and each
    hold at least one Linear (or Conv1D).
    """
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not all(any(is_linear(m) for m in child.modules()) for child in module):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise LayerListNotFoundError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of identical blocks "
            "containing Linear layers")
    return best


class QuantizationUnit:
    """A module whose Linears are quantized together: a transformer block, or the rest of the model.
    ``prefix``: its qualified name; ``linears``: {name inside ``module``: layer}."""

    def __init__(self, prefix: str, module: nn.Module, linears: dict[str, nn.Module], index: int | None):
        self.prefix, self.module, self.linears, self.index = prefix, module, linears, index

    def qualified(self, name: str) -> str:
        """The model-level name of the layer named ``name`` in the unit ("" when the unit is the layer)."""
        return ".".join(part for part in (self.prefix, name) if part)


def quantization_units(model: nn.Module, config: QuantizationConfig) -> tuple[str | None, list[QuantizationUnit]]:
    """The Linears ``config`` quantizes, by transformer block in order, then (unless the method
    quantizes blocks only) the rest of the model's as one last unit. ``(blocks name or None, units)``.
    Layers the skip pattern names stay dense; so do those whose shape the format cannot hold (logged)."""
    pattern = re.compile(config.skip_pattern()) if config.skip_pattern() else None
    try:
        blocks_name, blocks = find_blocks(model)
    except LayerListNotFoundError:
        if config.blocks_only:
            raise
        blocks_name, blocks = None, nn.ModuleList()

    def select(prefix: str, module: nn.Module, exclude: set[int]) -> dict[str, nn.Module]:
        found = {}
        for name, child in module.named_modules():
            if not is_linear(child) or id(child) in exclude:
                continue
            qualified = ".".join(part for part in (prefix, name) if part)
            if pattern is not None and pattern.search(qualified):
                continue
            out_features, in_features = linear_weight(child).shape
            reason = config.unsupported(out_features, in_features)
            if reason:
                logger.warning("leaving %s dense: %s", qualified, reason)
                continue
            found[name] = child
        return found

    units = [QuantizationUnit(f"{blocks_name}.{i}", block, select(f"{blocks_name}.{i}", block, set()), i)
             for i, block in enumerate(blocks)]
    if not config.blocks_only:
        inside = {id(m) for block in blocks for m in block.modules()}
        rest = select("", model, inside)
        if rest:
            units.append(QuantizationUnit("", model, rest, None))
    return blocks_name, units


class Residency:
    """Where a unit's weights are while the walk quantizes it. This base keeps the whole model where
    it is (``quantize_`` on a model in memory): every hook is a no-op. A streaming residency
    (:class:`lightllm.quantization.offload.StreamedBlocks`) materializes one block on the compute
    device in ``load``, writes the quantized block out and frees it in ``release``, so the walk and
    the methods stay the same whether the model is in memory or on disk."""

    def device(self, model: nn.Module) -> torch.device:
        """The device the units are quantized on (and calibration data is moved to)."""
        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def capturing(self, units: list["QuantizationUnit"]):
        """While calibration inputs are captured: yields the modules standing at the blocks' places
        (the walk hooks them to record each block's arguments)."""
        yield [unit.module for unit in units]

    def load(self, unit: "QuantizationUnit") -> None:
        """Before ``unit`` is quantized: its weights must be on :meth:`device`."""

    def release(self, unit: "QuantizationUnit") -> None:
        """After ``unit`` is quantized (and, for calibrated methods, its output computed)."""


IN_MEMORY = Residency()


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root``'s submodule ``name`` is (the one replacement every method uses)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def replace_each(targets: Iterable[tuple[nn.Module, str, str, nn.Module]], make_layer, desc: str,
                 progress: bool, total: int | None = None) -> int:
    """For each ``(root, name in root, qualified name, layer)``: put ``make_layer(layer)`` in its
    place. A layer the format cannot hold (``make_layer`` raises ValueError) stays dense and is
    logged, so one odd projection does not stop a whole model. The count replaced."""
    replaced = 0
    for root, name, qualified, layer in tqdm(targets, desc=desc, total=total, disable=not progress):
        try:
            quantized = make_layer(layer)
        except ValueError as exc:
            logger.warning("leaving %s dense: %s", qualified, exc)
            continue
        replace_module(root, name, quantized)
        replaced += 1
    return replaced


def _quantized_layer_types() -> tuple[type, ...]:
    return tuple({t for cls in _METHODS.values() for t in cls.layer_types()})


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantizationConfig, calibration=None, *, progress: bool = True,
              residency: Residency | None = None) -> nn.Module:
    """Quantize ``model``'s Linear layers in place with ``config`` (any registered method); returns
    the model, which remembers the config (``model.lightllm_quant_config``, what
    :func:`~lightllm.quantization.save_quantized` writes).

    ``calibration`` (methods that need it, GPTQ): token ids ``[n_samples, seqlen]`` (LongTensor),
    or a list of tokenizer outputs (dicts with ``input_ids`` and optionally ``attention_mask``).
    The output head and the embeddings stay dense.

    ``residency``: how units come and go (default: the model stays in memory);
    :func:`lightllm.quantization.quantize_checkpoint` passes one that streams blocks from disk.
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a quantization config ({', '.join(c.__name__ for c in _METHODS.values())}), "
                        f"got {type(config).__name__}")
    kinds = _quantized_layer_types()
    if any(isinstance(m, kinds) for m in model.modules()):
        raise ValueError("quantize_: the model is already quantized (it holds "
                         f"{sorted({type(m).__name__ for m in model.modules() if isinstance(m, kinds)})[0]} layers)")
    if config.needs_calibration and calibration is None:
        raise ValueError(f"quantize_: method {config.method!r} needs calibration data")
    _, units = quantization_units(model, config)
    was_training = model.training
    model.eval()  # no dropout while activations are collected
    try:
        if config.needs_calibration:
            replaced = config.quantize_calibrated(model, units, calibration, progress, residency or IN_MEMORY)
        elif residency is None:
            # replaced by their model-level names: a unit may itself be a Linear (a ModuleList of Linears)
            targets = [(model, unit.qualified(name), unit.qualified(name), layer)
                       for unit in units for name, layer in unit.linears.items()]
            replaced = replace_each(targets, lambda layer: config.make_layer(as_linear(layer)),
                                    config.method.upper(), progress, len(targets))
        else:  # the same replacement, one unit resident at a time
            replaced = 0
            for unit in tqdm(units, desc=config.method.upper(), disable=not progress):
                residency.load(unit)
                targets = [(model, unit.qualified(name), unit.qualified(name), layer)
                           for name, layer in unit.linears.items()]
                replaced += replace_each(targets, lambda layer: config.make_layer(as_linear(layer)),
                                         config.method.upper(), False, len(targets))
                del targets
                residency.release(unit)
    finally:
        model.train(was_training)
    if not replaced:
        raise ValueError(f"quantize_: no Linear layer of {type(model).__name__} could be quantized with {config.method}")
    logger.info("%s: quantized %d linear layers", config.method, replaced)
    model.lightllm_quant_config = config
    return model


__all__ = ["DEFAULT_SKIP", "IN_MEMORY", "LayerListNotFoundError", "QuantizationConfig", "QuantizationUnit", "Residency",
           "as_linear",
           "config_class", "config_from_dict", "find_blocks", "is_linear", "linear_weight", "make_config", "methods",
           "quantization_units", "quantize_", "register_format", "register_method", "replace_each", "replace_module"]
