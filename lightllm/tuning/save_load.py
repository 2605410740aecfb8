"""Adapter files for every tuning method: atomic folder writes, reading configs and tensors
(safetensors, or PyTorch's .bin as LLM-Adapters and AdapterHub write it), and checking every
tensor against what the model expects before anything changes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import torch


def write_files_atomically(directory, writers: dict[str, Callable[[pathlib.Path], None]]) -> None:
    """Write each file of ``writers`` (file name -> ``fn(path)``) into a temporary folder inside
    ``directory``, then rename them into place: a reader never sees a half-written file, and a
    failed write leaves the old files as they were."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        for name, write in writers.items():
            write(tmp / name)
        for name in writers:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_writer(obj: dict[str, Any]) -> Callable[[pathlib.Path], None]:
    """A writer of ``obj`` as PEFT and AdapterHub write configs (indent 2, sorted keys)."""
    def write(path: pathlib.Path) -> None:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return write


def tensors_writer(tensors: dict[str, torch.Tensor], safetensors: bool = True) -> Callable[[pathlib.Path], None]:
    def write(path: pathlib.Path) -> None:
        if safetensors:
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)
    return write


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} holds no {path.name}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_tensors(directory: pathlib.Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], pathlib.Path]:
    """The tensors of the first of ``names`` that exists in ``directory`` (.safetensors, or a
    PyTorch .bin read with ``weights_only=True``) and its path."""
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors = load_file(path)
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(f"{path} could not be read as a tensor file: {e}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{path} does not hold a dict of tensors")
        return tensors, path
    raise FileNotFoundError(f"{directory} holds none of {', '.join(names)}")


def check_tensors(expected: dict[str, tuple[str, tuple]], tensors: dict[str, torch.Tensor], path,
                  optional: set[str] = frozenset(), floating: set[str] | None = None) -> None:
    """Every key of ``tensors`` must be expected (key -> (where, shape)) with that shape, and every
    expected key but ``optional`` ones present, the ``floating`` ones (default: all) floating point;
    the error names the file, the key, the module and both shapes."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{path}: {unknown[0]} names a module the model has no adapter on"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = sorted(k for k in expected if k not in tensors and k not in optional)
    if missing:
        raise ValueError(f"{path} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for key, value in tensors.items():
        where, shape = expected[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but {where} needs {tuple(shape)}")
        if (floating is None or key in floating) and not value.is_floating_point():
            raise ValueError(f"{path}: {key} is {value.dtype}; adapter tensors are floating point")
