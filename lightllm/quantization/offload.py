"""Quantizing models larger than memory: ``quantize_checkpoint(src_dir, dst_dir, config, calibration)``.

The float model is never loaded whole. Its skeleton is built on the meta device (accelerate's
``init_empty_weights``; buffers such as rotary tables stay real, they are computed, not stored),
the weights outside the transformer blocks (embeddings, final norm, output head) are read, and
then the shared walk of :func:`~lightllm.quantization.quantize_` runs with a
:class:`StreamedBlocks` residency: before a block is quantized its tensors are read one by one
from the safetensors shards (``safe_open``, whichever shard each lives in) onto the compute
device; after it is quantized (and, for GPTQ, its output computed: the next block's calibration
input) the quantized block is written to its own shard and its tensors are dropped. What is
resident at any time: the non-block weights, one block, the calibration activations.

The directory written is what :func:`~lightllm.quantization.save_quantized` writes for the same
model (same tensors, dtypes and metadata; one shard per block instead of size-based shards), so
:func:`~lightllm.quantization.load_quantized` and the other tools read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import pathlib
import shutil
import tempfile
import time

import torch
from torch import nn

from . import bnb
from .bnb import BnbConfig
from .checkpoint import (
    INDEX_NAME,
    CheckpointError,
    _is_checkpoint_dir,
    _replace_directory,
    _unique_tensors,
    _write_json,
    weight_files,
)
from .core import QuantizationConfig, QuantizationUnit, Residency, find_blocks, quantize_

logger = logging.getLogger("lightllm")

# what a tokenizer directory may hold (copied as they are: no tokenizer library needed)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


class ShardedSafetensors:
    """A float checkpoint's tensors, read one at a time from its safetensors file(s).

    Only the headers are read up front (which key lives in which file); :meth:`read` opens each
    file it needs with ``safe_open`` and closes it again, so no shard stays mapped and nothing but
    the requested tensors is ever copied into memory.
    """

    def __init__(self, directory):
        from safetensors import safe_open

        self.directory = pathlib.Path(directory)
        files = weight_files(self.directory)
        not_safetensors = [f.name for f in files if f.suffix != ".safetensors"]
        if not_safetensors:
            raise CheckpointError(f"{self.directory}: streaming reads safetensors weights only, found "
                                  f"{', '.join(not_safetensors)} (save the model with safe_serialization)")
        self.file_of: dict[str, pathlib.Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"cannot read weight file {path}: {exc}") from exc
            for key in keys:
                self.file_of[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, keys) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` on the CPU, each an owned copy (not a view of a mapped file)."""
        from safetensors import safe_open

        by_file: dict[pathlib.Path, list[str]] = {}
        for key in keys:
            try:
                by_file.setdefault(self.file_of[key], []).append(key)
            except KeyError:
                raise CheckpointError(f"{self.directory}: the checkpoint lacks {key}") from None
        out = {}
        for path, names in by_file.items():
            handle = safe_open(str(path), framework="pt", device="cpu")
            try:
                for name in names:
                    out[name] = handle.get_tensor(name).clone()
            finally:
                del handle  # unmaps the file: its pages stop counting as ours
        return out


def _to_meta(module: nn.Module) -> None:
    """Drop ``module``'s tensors (and those of its children), keeping shapes: whatever still refers
    to the module (the walk's unit lists, hooks) no longer holds its memory."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for key, b in list(sub._buffers.items()):
            if b is not None and b.device.type != "meta":
                sub._buffers[key] = torch.empty_like(b, device="meta")
        for key, value in list(vars(sub).items()):  # caches kept as plain attributes (e.g. a permutation)
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                setattr(sub, key, None)


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). A freed block's
    tensors leave holes that the next block's slightly different allocations do not always fill;
    without this the resident size drifts upward by a fraction of a block per block."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class _Released(nn.Module):
    """Stands where a block was once it has been written out."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.prefix} has been quantized and written to disk; it is no longer in memory")


class _Stand(nn.Module):
    """Stands in for a block while calibration inputs are captured: the walk only keeps the first
    block's input and the arguments each block receives, so the later blocks need not be read.
    Returns its input shaped like the real first block's output."""

    def __init__(self, first_output: list):
        super().__init__()
        self.first_output = first_output

    def forward(self, hidden_states=None, *args, **kwargs):
        hidden = hidden_states if hidden_states is not None else kwargs.get("hidden_states")
        template = self.first_output[0] if self.first_output else None
        if isinstance(template, (tuple, list)):
            return (hidden, *template[1:])
        return hidden


class StreamedBlocks(Residency):
    """The residency of :func:`quantize_checkpoint`: blocks read from ``store`` on ``load`` and
    written to ``out_dir`` on ``release``."""

    def __init__(self, model: nn.Module, blocks_name: str, store: ShardedSafetensors, out_dir: pathlib.Path,
                 device: torch.device, config: QuantizationConfig, save_dtype: torch.dtype | None):
        self.model, self.blocks_name, self.store, self.out_dir = model, blocks_name, store, out_dir
        self._device, self.config, self.save_dtype = device, config, save_dtype
        self.blocks: nn.ModuleList = model.get_submodule(blocks_name)
        self.n_files = len(self.blocks) + 1  # one shard per block, then the rest of the model
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.loaded: set[int] = set()
        self.peak_block_bytes = 0

    def device(self, model):
        return self._device

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.n_files:05d}.safetensors"

    # ---- reading ----
    def materialize(self, module: nn.Module, prefix: str, skip: set[int] = frozenset()) -> None:
        """Fill ``module``'s own tensors and its children's (not those under modules in ``skip``)
        from the checkpoint, in place, on the compute device in the skeleton's dtypes. Buffers the
        checkpoint does not hold (computed ones: rotary tables) are moved as they are."""
        wanted: dict[str, tuple[nn.Module, str, str]] = {}
        stack = [(module, prefix)]
        while stack:
            sub, name = stack.pop()
            if id(sub) in skip:
                continue
            for key, p in sub._parameters.items():
                if p is not None:
                    wanted[f"{name}.{key}" if name else key] = (sub, key, "p")
            for key, b in sub._buffers.items():
                if b is None:
                    continue
                full = f"{name}.{key}" if name else key
                if full in self.store:
                    wanted[full] = (sub, key, "b")
                elif b.device != self._device:
                    sub._buffers[key] = b.to(self._device)
            stack += [(child, f"{name}.{n}" if name else n) for n, child in sub.named_children()]
        present = [k for k in wanted if k in self.store]
        for key, tensor in self.store.read(present).items():
            sub, attr, kind = wanted[key]
            old = sub._parameters[attr] if kind == "p" else sub._buffers[attr]
            if tuple(old.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{self.store.directory}: {key} is {tuple(tensor.shape)} in the checkpoint but "
                                      f"{tuple(old.shape)} in the model its config describes")
            value = tensor.to(self._device, old.dtype if old.is_floating_point() else tensor.dtype)
            del tensor
            if kind == "p":
                sub._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                sub._buffers[attr] = value

    def load(self, unit: QuantizationUnit) -> None:
        if unit.index is None or unit.index in self.loaded:
            return  # the rest of the model is resident from the start
        self.materialize(unit.module, unit.prefix)
        meta = [n for n, p in unit.module.named_parameters() if p.device.type == "meta"]
        if meta:
            raise CheckpointError(f"{self.store.directory}: the checkpoint lacks {unit.prefix}.{meta[0]}"
                                  f"{f' and {len(meta) - 1} more' if len(meta) > 1 else ''}")
        self.loaded.add(unit.index)

    # ---- writing ----
    def write(self, state: dict[str, torch.Tensor], number: int) -> None:
        from safetensors.torch import save_file

        name = self.shard_name(number)
        save_file(state, str(self.out_dir / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(state, name))
        self.total_size += sum(t.numel() * t.element_size() for t in state.values())

    def state_of(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """What save_quantized writes for these tensors (same dtype rule, tied ones once)."""
        keep = bnb.keeps_its_dtype if isinstance(self.config, BnbConfig) else None
        state = _unique_tensors(module, self.save_dtype, keep=keep)
        return {f"{prefix}.{k}" if prefix else k: v for k, v in state.items()}

    def release(self, unit: QuantizationUnit) -> None:
        if unit.index is None:
            return  # written with the rest by finish()
        state = self.state_of(unit.module, unit.prefix)
        self.peak_block_bytes = max(self.peak_block_bytes, sum(t.numel() * t.element_size() for t in state.values()))
        self.write(state, unit.index + 1)
        del state
        for layer in unit.linears.values():  # the dense originals the walk still refers to
            _to_meta(layer)
        _to_meta(unit.module)
        unit.linears = {}
        self.blocks[unit.index] = _Released(unit.prefix)
        unit.module = self.blocks[unit.index]
        self.loaded.discard(unit.index)
        _return_freed_memory()

    @contextlib.contextmanager
    def capturing(self, units):
        """The first block for real (its output's shape is what the stand-ins return), the others
        as stand-ins, so capturing reads one block, not the model."""
        block_units = [u for u in units if u.index is not None]
        if not block_units:
            yield []
            return
        first = block_units[0]
        self.load(first)
        first_output: list = []
        hook = first.module.register_forward_hook(lambda m, a, out: first_output.append(out) if not first_output
                                                  else None)
        originals = {u.index: self.blocks[u.index] for u in block_units[1:]}
        for index in originals:
            self.blocks[index] = _Stand(first_output)
        try:
            yield [first.module] + [self.blocks[i] for i in originals]
        finally:
            hook.remove()
            first_output.clear()
            for index, block in originals.items():
                self.blocks[index] = block

    def finish(self, model: nn.Module) -> None:
        self.write(self.state_of(model, ""), self.n_files)
        _write_json(self.out_dir / INDEX_NAME, {"metadata": {"total_size": self.total_size},
                                                "weight_map": self.weight_map})


def _build_skeleton(src: pathlib.Path, dtype):
    """The model its config describes, parameters on the meta device; ``(model, hf config)``."""
    from .._extras import require

    transformers = require("transformers", "lightllm.quantization.quantize_checkpoint")
    accelerate = require("accelerate", "lightllm.quantization.quantize_checkpoint")
    config = transformers.AutoConfig.from_pretrained(src)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"quantize_checkpoint: {src} is already quantized (its config.json has a "
                         "quantization_config); give the float model")
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"quantize_checkpoint: dtype must be a floating torch.dtype or 'auto', got {dtype!r}")
    # include_buffers=False: rotary tables and the like are computed in __init__, not stored
    with accelerate.init_empty_weights(include_buffers=False):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:
            model = transformers.AutoModel.from_config(config, dtype=dtype)
    return model.eval(), config


@torch.no_grad()
def quantize_checkpoint(src_dir, dst_dir, config: QuantizationConfig, calibration=None, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto",
                        save_dtype: torch.dtype | None | str = "auto", tokenizer=None,
                        progress: bool = True) -> pathlib.Path:
    """Quantize the float checkpoint in ``src_dir`` (a transformers model directory with
    safetensors weights, sharded or not) into ``dst_dir`` without ever holding the model in
    memory: one transformer block at a time on ``device``, every other block on disk.

    ``config``, ``calibration``: as for :func:`~lightllm.quantization.quantize_` (every method).
    ``dtype``: the dtype the blocks are computed in ("auto": the checkpoint's, as
    ``from_pretrained(dtype="auto")``); ``save_dtype``: as ``save_quantized``'s ``dtype``.
    ``tokenizer``: saved with the checkpoint; by default the tokenizer files of ``src_dir`` are
    copied. The result is the checkpoint ``quantize_(from_pretrained(src_dir, dtype=dtype), ...)``
    followed by ``save_quantized`` writes: the same tensors, bit for bit.

    The checkpoint is written next to ``dst_dir`` and renamed into place, so a failure leaves any
    previous checkpoint there untouched. Returns ``dst_dir``.
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"quantize_checkpoint: config must be a quantization config, got {type(config).__name__}")
    src, out = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"quantize_checkpoint: {src} is not a model directory (no config.json)")
    if out.resolve() == src.resolve():
        raise ValueError("quantize_checkpoint: the destination is the source directory; choose another")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_checkpoint_dir(out))):
        raise FileExistsError(f"quantize_checkpoint: {out} exists and is not a model checkpoint; refusing to "
                              "replace it (choose a new directory)")
    if config.needs_calibration and calibration is None:
        raise ValueError(f"quantize_checkpoint: method {config.method!r} needs calibration data")
    if save_dtype == "auto":
        save_dtype = None if isinstance(config, BnbConfig) else torch.float16
    device = torch.device(device)
    start = time.perf_counter()
    store = ShardedSafetensors(src)
    model, hf_config = _build_skeleton(src, dtype)
    blocks_name, blocks = find_blocks(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        residency = StreamedBlocks(model, blocks_name, store, tmp, device, config, save_dtype)
        # everything outside the blocks stays resident (embeddings feed the calibration inputs)
        residency.materialize(model, "", skip={id(blocks)})
        if getattr(hf_config, "tie_word_embeddings", False):
            model.tie_weights()
        meta = [n for n, p in model.named_parameters()
                if p.device.type == "meta" and not n.startswith(blocks_name + ".")]
        if meta:
            raise CheckpointError(f"{src}: the checkpoint lacks {', '.join(meta[:8])}")
        quantize_(model, config, calibration, progress=progress, residency=residency)
        residency.finish(model)
        quant = config.to_dict()
        model_config = model.config.to_dict()
        model_config["quantization_config"] = quant
        _write_json(tmp / "config.json", model_config)
        if not isinstance(config, BnbConfig):  # AutoGPTQ's own file
            _write_json(tmp / "quantize_config.json", quant)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        tmp.chmod(0o755)
        _replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("quantize_checkpoint: %s -> %s (%s, %d blocks streamed) in %.1f s", src, out, config.method,
                len(blocks), time.perf_counter() - start)
    return out


__all__ = ["ShardedSafetensors", "StreamedBlocks", "quantize_checkpoint"]
