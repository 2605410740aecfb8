"""What every tuning method's configuration shares: the registry keyed by ``peft_type``, dict
round trips with PEFT's rules for unknown and refused keys, and target matching.

A method's config is a dataclass that subclasses :class:`TunerConfig` and is registered with
:func:`register_config`. The fields the shared base reads (``target_modules``,
``exclude_modules``, ``layers_to_transform``, ``layers_pattern``, ``modules_to_save``,
``inference_mode``, ``peft_type``) are declared by each method, with its own defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, ClassVar

logger = logging.getLogger("lightllm")

CONFIG_TYPES: dict[str, type["TunerConfig"]] = {}


def register_config(cls: type["TunerConfig"]) -> type["TunerConfig"]:
    CONFIG_TYPES[cls.PEFT_TYPE] = cls
    return cls


class TunerConfig:
    """Base of the methods' configuration dataclasses."""

    PEFT_TYPE: ClassVar[str] = ""
    # Keys of the method's upstream config that change the math and that lightllm does not
    # implement: key -> predicate on the value. Refused with a clear error, never ignored.
    REFUSED: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(d.get(key), list):
                d[key] = sorted(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        name = cls.__name__
        for key, refused in cls.REFUSED.items():
            if key in d and refused(d[key]):
                raise ValueError(f"{name}: {key}={d[key]!r} changes the adapter's math and is not supported by lightllm")
        if d.get("peft_type", cls.PEFT_TYPE) != cls.PEFT_TYPE:
            raise ValueError(f"adapter type {d.get('peft_type')!r} is not {cls.PEFT_TYPE}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls.REFUSED)
        if unknown:
            logger.info("%s: ignoring fields %s", name, unknown)
        return cls(**{k: v for k, v in d.items() if k in names})

    def _normalize_targets(self) -> None:
        """Sets and tuples of module names become sorted lists (JSON-friendly, as PEFT writes them)."""
        for key in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, key, None), (set, tuple)):
                setattr(self, key, sorted(getattr(self, key)))
        if isinstance(getattr(self, "target_modules", None), str) and (
                getattr(self, "layers_to_transform", None) is not None or getattr(self, "layers_pattern", None)):
            raise ValueError(f"{type(self).__name__}: layers_to_transform and layers_pattern need target_modules as a "
                             "list (with a regex, put the layers into the regex), as in PEFT")


def config_from_dict(d: dict[str, Any]) -> TunerConfig:
    """The registered config class for ``d["peft_type"]``, built from ``d`` (no peft_type: LoRA, as
    older files of PEFT and lightllm were read)."""
    peft_type = d.get("peft_type", "LORA")
    if peft_type not in CONFIG_TYPES:
        raise ValueError(f"adapter type {peft_type!r} is not supported by lightllm (supported: "
                         f"{', '.join(sorted(CONFIG_TYPES))})")
    return CONFIG_TYPES[peft_type].from_dict(d)


# ---- target matching (PEFT's rules) ---------------------------------------------------------

def names_match(name: str, entries: list[str] | str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a full regex match; a list
    matches a module whose name equals an entry or ends with '.' + entry."""
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == t or name.endswith("." + t) for t in entries)


def layer_index_ok(name: str, layers_to_transform, layers_pattern) -> bool:
    """PEFT's layers_to_transform: the layer index is the number after ``<layers_pattern>.`` (any
    module list when no pattern is given; the last such number in the name)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [rf".*\.{re.escape(p)}\.(\d+)\." for p in patterns] if patterns else [r".*\.[^.]*\.(\d+)\."]
    index = next((m for m in (re.match(r, name) for r in regexes) if m is not None), None)
    if index is None:
        return False
    layers = layers_to_transform
    return int(index.group(1)) in ([layers] if isinstance(layers, int) else layers)


def target_matches(name: str, config, is_output_head: bool, wrappable: bool) -> bool:
    """Whether ``config`` targets module ``name``: target_modules (list, regex, or "all-linear":
    every wrappable layer but the output head), then layers_to_transform, then exclude_modules."""
    targets = config.target_modules
    if targets is None:
        raise ValueError(f"{type(config).__name__}.target_modules is required (a list of module names, a regex, "
                         "or 'all-linear')")
    if targets == "all-linear":
        matched = wrappable and not is_output_head
    else:
        matched = names_match(name, targets)
        if matched and config.layers_to_transform is not None:
            matched = layer_index_ok(name, config.layers_to_transform, config.layers_pattern)
    if matched and getattr(config, "exclude_modules", None) and names_match(name, config.exclude_modules):
        return False
    return matched


def pattern_value(name: str, pattern: dict[str, Any], default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module's last name parts or
    the whole name as a regex."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", name) or re.fullmatch(key, name):
            return value
    return default


def modules_to_save_matches(name: str, entries: list[str] | None) -> bool:
    # PEFT's rule for modules_to_save: the module's name ends with an entry.
    return bool(entries) and any(name.endswith(entry) for entry in entries)
