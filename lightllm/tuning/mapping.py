"""One entry point for every tuning method: ``get_peft_model`` picks the method from the config's
type, ``from_pretrained`` from the adapter folder (PEFT's layout by ``peft_type``, or another
tool's layout that a method registered a reader for, such as AdapterHub's)."""

from __future__ import annotations

import pathlib
from typing import Callable

import torch
from torch import nn

from .config import TunerConfig, config_from_dict
from .save_load import read_json, read_tensors
from .tuner import BIN_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, TunerModel

# peft_type -> the method's TunerModel subclass
MODEL_TYPES: dict[str, type[TunerModel]] = {}

# Readers of other tools' adapter folders: fn(directory) -> (model class, config, tensors in PEFT's
# key layout, weights path), or None when the folder is not in that tool's layout.
FOLDER_READERS: list[Callable] = []


def register_method(model_type, *peft_types: str):
    """Serve configs of ``peft_types`` (default: the model type's ``config_type.PEFT_TYPE``) with
    ``model_type``: a TunerModel, or any class with the same constructor and ``from_pretrained``."""
    for peft_type in peft_types or (model_type.config_type.PEFT_TYPE,):
        MODEL_TYPES[peft_type] = model_type
    return model_type


def get_peft_model(model: nn.Module, config: TunerConfig, adapter_name: str = "default") -> TunerModel:
    """Wrap ``model``'s matching layers with the adapters ``config`` describes (in place); returns
    the PEFT-style wrapper of the config's method (LoraModel for a LoraConfig, ...)."""
    model_type = MODEL_TYPES.get(getattr(type(config), "PEFT_TYPE", None))
    if model_type is None or not isinstance(config, TunerConfig):
        raise TypeError(f"config must be a tuning method's config (for {', '.join(sorted(MODEL_TYPES))}), "
                        f"got {type(config).__name__}")
    return model_type(model, config, adapter_name)


def read_adapter_folder(directory) -> tuple[type[TunerModel], TunerConfig, dict[str, torch.Tensor], pathlib.Path]:
    """(method, config, tensors in PEFT's key layout, weights path) of an adapter folder."""
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    for reader in FOLDER_READERS:
        found = reader(path)
        if found is not None:
            return found
    raw = read_json(path / CONFIG_NAME)
    config = config_from_dict(raw)
    tensors, weights = read_tensors(path, (WEIGHTS_NAME, BIN_WEIGHTS_NAME))
    return MODEL_TYPES[config.PEFT_TYPE], config, tensors, weights


def from_pretrained(model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False, *,
                    revision: str | None = None, subfolder: str | None = None) -> TunerModel:
    """Load an adapter saved by lightllm, PEFT (LoRA), LLM-Adapters or AdapterHub (bottleneck
    adapters) onto ``model``, frozen unless ``is_trainable`` (PEFT's ``PeftModel.from_pretrained``).
    ``directory`` may be a Hugging Face hub id instead, at ``revision``, with ``subfolder`` (as PEFT's
    keywords; :func:`lightllm.hub.resolve_folder`). The file is checked against the model before the
    model is wrapped: a file that does not fit leaves the model as it was."""
    from ..hub import resolve_folder

    model_type, config, tensors, path = read_adapter_folder(
        resolve_folder(directory, revision, subfolder, what="adapter"))
    return model_type.from_pretrained(model, config, tensors, path, adapter_name, is_trainable)
