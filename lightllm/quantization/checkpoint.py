"""GPTQ checkpoints on disk, as AutoGPTQ, GPTQModel and transformers write and read them (and
bitsandbytes-format ones, as transformers writes them with a BitsAndBytesConfig).

A checkpoint directory holds ``config.json`` (with ``quantization_config``), ``quantize_config.json``
(the same dict, for AutoGPTQ), the weights as safetensors (one file, or shards with an index), and
the tokenizer files. Quantized Linears appear as ``<module>.qweight / qzeros / scales / g_idx``.

Reading accepts what those tools write: ``model.safetensors``, shards with
``model.safetensors.index.json``, AutoGPTQ's ``<model_file_base_name>.safetensors`` (e.g.
``gptq_model-4bit-128g.safetensors``), and ``.bin`` files; v1 and v2 zero conventions, corrected
from the data when a symmetric checkpoint is mislabelled. The model is built on the meta device
(no dense weights are ever materialized) and filled from the files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ..nn.quant_linear import QuantLinear
from . import bnb
from .bnb import BnbConfig
from .core import QuantizationConfig, config_from_dict
from .gptq import format as gptq_format

logger = logging.getLogger("lightllm")

UNSUPPORTED_FORMATS = ("marlin", "bitblas", "ipex", "awq", "exllama", "qqq")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read: missing, corrupt or in a format we do not read."""


# ---- saving ------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, directory, tokenizer=None, config: QuantizationConfig | None = None,
                   max_shard_size: int = 4 * 1024**3, dtype: torch.dtype | None | str = "auto") -> pathlib.Path:
    """Write ``model`` (quantized by :func:`~lightllm.quantization.quantize_`) as a checkpoint
    directory in its method's format: GPTQ's for gptq and rtn, the bitsandbytes format transformers
    writes for nf4, fp4 and int8.

    Dense floating tensors (embeddings, norms, the output head) are stored as ``dtype``: "auto" is
    float16 for GPTQ, as the GPTQ tools store them, and each tensor's own dtype for bitsandbytes
    (as transformers saves); ``dtype=None`` keeps each tensor's own dtype. Quantization state
    (absmax, code maps, SCB) is never cast.

    The directory is written next to its destination and renamed into place, so a failure leaves
    any previous checkpoint there untouched; an existing destination is replaced only when it is
    empty or itself a checkpoint (never an unrelated folder). Weights over ``max_shard_size``
    bytes are sharded.
    """
    config = config or getattr(model, "lightllm_quant_config", None)
    if config is None:
        raise ValueError("save_quantized: the model carries no quantization config (quantize it with quantize_, "
                         "or pass config=)")
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"save_quantized: config must be a quantization config, got {type(config).__name__}")
    bnb_format = isinstance(config, BnbConfig)
    if dtype == "auto":
        dtype = None if bnb_format else torch.float16
    kind = config.layer_type
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    if not layers:
        raise ValueError(f"save_quantized: the model has no {kind.__name__} layers")
    for name, layer in layers.items() if not bnb_format else ():  # the config is written for every layer: it must describe them
        if (layer.bits, layer.group_size, layer.checkpoint_format) != (config.bits, config.group_size,
                                                                       config.checkpoint_format):
            raise ValueError(f"save_quantized: layer {name} has bits={layer.bits}, group_size={layer.group_size}, "
                             f"checkpoint_format={layer.checkpoint_format!r} but the config says bits={config.bits}, "
                             f"group_size={config.group_size}, checkpoint_format={config.checkpoint_format!r}")
    from safetensors.torch import save_file

    out = pathlib.Path(directory)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_checkpoint_dir(out))):
        raise FileExistsError(f"save_quantized: {out} exists and is not a model checkpoint; refusing to replace it "
                              "(choose a new directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = _unique_tensors(model, dtype, keep=bnb.keeps_its_dtype if bnb_format else None)
        shards = _shard(state, max_shard_size)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        quant = config.to_dict()
        model_config = model.config.to_dict() if hasattr(model, "config") else {}
        model_config["quantization_config"] = quant
        _write_json(tmp / "config.json", model_config)
        if not bnb_format:  # AutoGPTQ's own file
            _write_json(tmp / "quantize_config.json", quant)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            with contextlib.suppress(Exception):
                generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        _replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s checkpoint to %s", config.method if bnb_format else f"{config.bits}-bit", out)
    return out


def _is_checkpoint_dir(path: pathlib.Path) -> bool:
    """A directory that only holds what a model checkpoint holds (so replacing it loses nothing else)."""
    if not (path / "config.json").is_file():
        return False
    return all(p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")
                                or p.name in ("merges.txt", "vocab.txt"))
               for p in path.iterdir())


def _unique_tensors(model: nn.Module, dtype: torch.dtype | None, keep=None) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared storage), contiguous,
    floating tensors in ``dtype`` (but those ``keep(key)`` names)."""
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue  # e.g. lm_head.weight tied to the embeddings: load_quantized re-ties it
        if ident is not None:
            seen[ident] = key
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point() and not (keep and keep(key)):
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    return state


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    return shards


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _replace_directory(new: pathlib.Path, dest: pathlib.Path) -> None:
    """Move ``new`` to ``dest``; an existing ``dest`` is moved aside first and removed afterwards."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------

def read_quant_config(directory) -> dict[str, Any]:
    """The checkpoint's quantization config (config.json's ``quantization_config``, else
    ``quantize_config.json``), checked to be a GPTQ format we read."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    quant = None
    config_path = directory / "config.json"
    if config_path.is_file():
        quant = _read_json(config_path).get("quantization_config")
    if quant is None and (directory / "quantize_config.json").is_file():
        quant = _read_json(directory / "quantize_config.json")
    if quant is None:
        raise CheckpointError(f"{directory} is not a quantized checkpoint: neither config.json's quantization_config "
                              "nor quantize_config.json is there")
    method = str(quant.get("quant_method", "gptq")).lower()
    if method == "bitsandbytes":
        try:
            BnbConfig.from_dict(quant)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}: an unusable bitsandbytes quantization_config: {exc}") from None
        return dict(quant, quant_method=method)
    fmt = str(quant.get("checkpoint_format", "gptq")).lower()
    quant = dict(quant, quant_method=method, checkpoint_format=fmt)
    if method != "gptq":
        raise CheckpointError(f"{directory}: quant_method {method!r} is not supported; lightllm reads GPTQ checkpoints "
                              "(quant_method 'gptq') and bitsandbytes' 4-bit and 8-bit ones ('bitsandbytes')")
    if quant.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in gptq_format.CHECKPOINT_FORMATS:
        raise CheckpointError(f"{directory}: checkpoint_format {fmt!r} is not supported (lightllm reads 'gptq' and "
                              f"'gptq_v2'; {', '.join(UNSUPPORTED_FORMATS)} layouts are not)")
    if quant.get("bits") not in gptq_format.GPTQ_BITS:
        raise CheckpointError(f"{directory}: bits={quant.get('bits')!r} is not supported (one of {gptq_format.GPTQ_BITS})")
    return quant


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def weight_files(directory, quant: dict[str, Any] | None = None) -> list[pathlib.Path]:
    """The checkpoint's weight files, by the names the GPTQ tools use."""
    directory = pathlib.Path(directory)
    bases = [quant["model_file_base_name"]] if quant and quant.get("model_file_base_name") else []
    bases += ["model", "pytorch_model"]
    for base in bases:
        for suffix in (".safetensors", ".bin"):
            index = directory / f"{base}{suffix}.index.json"
            if index.is_file():
                files = sorted(set(_read_json(index).get("weight_map", {}).values()))
                missing = [f for f in files if not (directory / f).is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists weight files that are missing: {', '.join(missing)}")
                return [directory / f for f in files]
            single = directory / f"{base}{suffix}"
            if single.is_file():
                return [single]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointError(f"{directory} holds no weight file (*.safetensors or *.bin)")
    raise CheckpointError(f"{directory} holds several weight files but no index: {', '.join(f.name for f in found)}")


def _load_file(path: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise various types for damaged files
        raise CheckpointError(f"cannot read weight file {path}: {exc}") from exc


def _empty_model_context():
    """Build modules with their parameters on the meta device, through accelerate's own context
    (``init_empty_weights``): no dense weight is allocated. Buffers stay real (include_buffers=False):
    rotary tables and the like are computed in __init__ and are not in checkpoints."""
    from .._extras import require

    accelerate = require("accelerate", "lightllm.quantization.load_quantized")
    return accelerate.init_empty_weights(include_buffers=False)


def load_quantized(directory, device=None, dtype: torch.dtype | None = None, model_class=None, *,
                   revision: str | None = None, subfolder: str | None = None) -> nn.Module:
    """Load a GPTQ checkpoint directory as a transformers model whose quantized Linears are
    :class:`~lightllm.nn.QuantLinear`, or a bitsandbytes one (``quant_method: "bitsandbytes"``, as
    transformers writes with ``load_in_4bit`` / ``load_in_8bit``) with lightllm's
    :class:`~lightllm.nn.Linear4bit` / :class:`~lightllm.nn.Linear8bitLt`.

    ``dtype``: of the dense parameters (embeddings, norms, output head); default float16 on a GPU,
    float32 on the CPU. ``model_class``: default ``AutoModelForCausalLM`` (falling back to
    ``AutoModel`` for architectures without a causal-LM head). ``directory`` may be a Hugging Face
    hub id instead, at ``revision``, with ``subfolder`` (:func:`lightllm.hub.resolve_folder`).
    """
    from .._extras import require
    from ..hub import resolve_folder

    transformers = require("transformers", "lightllm.quantization.load_quantized")
    # transformers is imported now anyway: register lightllm with its quantizer registry, so that
    # from_pretrained of lightllm's checkpoints builds these same layers (lightllm.integrations.transformers)
    # (load_quantized itself does not need it: a transformers whose registry moved only loses that)
    try:
        from ..integrations import transformers as _registration  # noqa: F401
    except (ImportError, AttributeError) as exc:
        logger.warning("lightllm is not registered with transformers %s's quantizers (%s: %s); load_quantized "
                       "works, from_pretrained of lightllm's checkpoints does not", transformers.__version__,
                       type(exc).__name__, exc)
    try:
        directory = resolve_folder(directory, revision, subfolder, what="checkpoint")
    except FileNotFoundError as exc:  # one error type for every unusable checkpoint, as below
        raise CheckpointError(str(exc)) from exc
    quant = read_quant_config(directory)
    files = weight_files(directory, quant)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        from ..models import default_dtype
        dtype = default_dtype(device)

    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # or transformers would look for its own GPTQ backend
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_load_file(path))
    with _empty_model_context():
        if model_class is None:
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = transformers.AutoModel.from_config(config)
        elif hasattr(model_class, "from_config"):  # an Auto class
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    model.eval()
    quant_config = config_from_dict(quant)
    if isinstance(quant_config, BnbConfig):
        bnb.install_bnb_layers(model, state, quant_config)
    else:
        _install_quant_linears(model, state, quant)
        _fix_zero_convention(model, state, quant)

    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{directory}: the checkpoint holds tensors the model does not have: "
                              f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # A key may be absent only when it is tied to one that was loaded (the output head); anything
    # else would silently keep its initial value (zeros in a QuantLinear, meta elsewhere).
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in tensors.items() if k not in set(missing)}
    absent = [k for k in missing if id(tensors[k]) not in loaded]
    absent += [name for name, p in model.named_parameters() if p.device.type == "meta" and name not in absent]
    if absent:
        raise CheckpointError(f"{directory}: the checkpoint lacks {', '.join(absent[:8])}"
                              f"{' ...' if len(absent) > 8 else ''}")
    for name, p in model.named_parameters():
        p.requires_grad_(False)
    model.to(device)
    _cast_dense(model, dtype)
    model.lightllm_quant_config = quant_config
    return model


def _install_quant_linears(model: nn.Module, state: dict[str, torch.Tensor], quant: dict[str, Any],
                           device=None) -> None:
    """Replace every module that has a ``qweight`` in the checkpoint by a QuantLinear of its shape
    (on ``device``: "meta" when a loader fills it later; only the tensors' shapes are read)."""
    bits, group_size = quant["bits"], quant.get("group_size", -1)
    fmt = quant.get("checkpoint_format", "gptq")
    prefixes = [key[: -len(".qweight")] for key in state if key.endswith(".qweight")]
    if not prefixes:
        raise CheckpointError("the checkpoint has no quantized layers (no '*.qweight' tensors)")
    for prefix in prefixes:
        try:
            old = model.get_submodule(prefix)
        except AttributeError as exc:
            raise CheckpointError(f"the checkpoint quantizes {prefix!r}, which this model does not have") from exc
        qweight, scales = state[prefix + ".qweight"], state.get(prefix + ".scales")
        if scales is None:
            raise CheckpointError(f"the checkpoint has {prefix}.qweight but no {prefix}.scales")
        in_features, out_features = qweight.shape[0] * 32 // bits, scales.shape[1]
        has_bias = prefix + ".bias" in state
        if getattr(old, "bias", None) is not None and not has_bias:
            raise CheckpointError(f"the checkpoint lacks {prefix}.bias (the model's layer has a bias)")
        new = QuantLinear(in_features, out_features, bits, group_size, bias=has_bias, checkpoint_format=fmt,
                          device=device)
        old_shape = getattr(old, "weight", None)
        if old_shape is not None and sorted(old.weight.shape) != sorted((out_features, in_features)):
            raise CheckpointError(f"{prefix}: the checkpoint holds a {out_features} x {in_features} quantized weight "
                                  f"but the model's layer is {tuple(old.weight.shape)}")
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _fix_zero_convention(model: nn.Module, state: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    """Symmetric checkpoints are sometimes labelled with the wrong zero convention: trust the data.
    (Asymmetric zeros vary with the weights, so the data cannot tell: the label stands.)"""
    if not quant.get("sym", True):
        return
    bits = quant["bits"]
    labelled = quant.get("checkpoint_format", "gptq")
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        zeros = state.get(name + ".qzeros")
        if zeros is None:  # offloaded by a device_map: read when it is loaded
            continue
        detected = gptq_format.detect_zero_convention(zeros, bits)
        if detected is not None and detected != labelled:
            logger.warning("%s: zeros say checkpoint_format=%r though the config says %r; reading them as %r",
                           name, detected, labelled, detected)
            module.checkpoint_format = detected


def _cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Dense floating parameters and buffers to ``dtype``; QuantLinear keeps its format's float16
    scales (the kernels take the activation dtype as it comes)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for key, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                module._parameters[key] = nn.Parameter(p.to(dtype), requires_grad=False)
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype and "inv_freq" not in key:
                module._buffers[key] = b.to(dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


__all__ = ["CheckpointError", "load_quantized", "read_quant_config", "save_quantized", "weight_files"]
