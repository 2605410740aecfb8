"""Quantize a whole Hugging Face model, block by block (GPTQ or round-to-nearest).

The walk, as GPTQ-for-LLaMa and AutoGPTQ do it:

1. find the model's list of transformer blocks (the largest ModuleList of identical blocks that
   hold Linear or GPT-2 Conv1D layers: LLaMA/Mistral/Qwen2 ``model.layers``, GPT-2 ``transformer.h``,
   GPT-NeoX ``gpt_neox.layers``, BERT ``encoder.layer``, ...);
2. run the calibration set through the model up to the first block and keep the block's inputs
   (hidden states and the keyword arguments the model passes: masks, position embeddings);
3. for each block: record the Hessian of every Linear's input with forward hooks, solve, replace
   each Linear by a :class:`~lightllm.nn.QuantLinear`, then recompute the block's output from the
   quantized block: it is the next block's input. With ``true_sequential`` the Linears of a block
   are quantized in the order the forward pass reaches them (layers that read the same tensor, such
   as q/k/v, together), each group seeing the outputs of the groups already quantized.

Only the current block's inputs and outputs are held, besides the calibration token ids.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.quant_linear import QuantLinear
from . import gptq_format
from .gptq import GPTQResult, HessianAccumulator, gptq_solve

logger = logging.getLogger("lightllm")

METHODS = ("gptq", "rtn")


@dataclass
class QuantConfig:
    """What to quantize to and how; the same fields as AutoGPTQ's ``quantize_config.json``.

    bits: 2, 3, 4 or 8.  group_size: input columns per group, -1 for one per output row.
    sym: symmetric grids (zero fixed at the middle).  desc_act: act-order (columns by decreasing
    Hessian diagonal).  static_groups: compute every group's grid before the solve (act-order then
    keeps g_idx = k // group_size).  damp_percent: damping as a fraction of mean(diag(H)).
    true_sequential: quantize a block's Linears in forward order.  method: "gptq" or "rtn".
    checkpoint_format: zero-point convention of the written tensors ("gptq" v1 or "gptq_v2").
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    method: str = "gptq"
    checkpoint_format: str = "gptq"

    def __post_init__(self):
        if self.bits not in gptq_format.GPTQ_BITS:
            raise ValueError(f"QuantConfig: bits must be one of {gptq_format.GPTQ_BITS}, got {self.bits!r}")
        if not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0)):
            raise ValueError(f"QuantConfig: group_size must be a positive int or -1, got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig: method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"QuantConfig: damp_percent must lie in (0, 1), got {self.damp_percent}")
        gptq_format._check_format(self.checkpoint_format)

    @property
    def zero_min(self) -> int:
        """The smallest zero point the grid may use: v1 checkpoints store z - 1, so z = 0 cannot be
        written; asymmetric grids for v1 keep z >= 1 (a group whose weights are all positive then
        loses its top level instead of corrupting its neighbours' zeros)."""
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` dict that AutoGPTQ, GPTQModel and transformers read."""
        d = dataclasses.asdict(self)
        d.pop("method")
        d["quant_method"] = "gptq"
        # where GPTQModel records its writer; readers ignore what they do not know there
        d["meta"] = {"quantizer": ["lightllm:0.1.0"], "lightllm_method": self.method}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"method"}
        kwargs = {k: v for k, v in d.items() if k in names}
        method = (d.get("meta") or {}).get("lightllm_method", "gptq")
        return cls(**kwargs, method=method if method in METHODS else "gptq")


class LayerListNotFoundError(ValueError):
    """The model has no recognisable list of transformer blocks."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D


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
        if not all(any(_is_linear(m) for m in child.modules()) for child in module):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise LayerListNotFoundError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of identical blocks "
            "containing Linear layers")
    return best


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """[out_features, in_features] (GPT-2's Conv1D stores the transpose)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _in_features(module: nn.Module) -> int:
    return _linear_weight(module).shape[1]


class _StopForward(Exception):
    pass


def _as_batches(calibration, device) -> list[dict[str, torch.Tensor]]:
    """Calibration data -> list of model keyword arguments (input_ids, attention_mask)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration must be a LongTensor of token ids [n_samples, seqlen], got "
                             f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        if calibration.numel() == 0:
            raise ValueError("calibration holds no tokens")
        return [{"input_ids": chunk.to(device, torch.long)} for chunk in calibration.split(8)]
    batches = []
    for item in calibration:
        ids = item["input_ids"]
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        batch = {"input_ids": ids.to(device, torch.long)}
        if item.get("attention_mask") is not None:
            mask = torch.as_tensor(item["attention_mask"])
            batch["attention_mask"] = (mask[None] if mask.dim() == 1 else mask).to(device)
        batches.append(batch)
    if not batches:
        raise ValueError("calibration holds no samples")
    return batches


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _quant_linear_from(linear: nn.Module, result: GPTQResult, config: QuantConfig) -> QuantLinear:
    return QuantLinear.from_quantized(result.q, result.zeros, result.scales, result.g_idx, config.bits,
                                      config.group_size, linear.bias, config.checkpoint_format)


def _rtn_result(linear: nn.Module, config: QuantConfig) -> GPTQResult:
    t = gptq_format.quantize_rtn(_linear_weight(linear).detach(), config.bits, config.group_size, sym=config.sym,
                                 zero_min=config.zero_min)
    return GPTQResult(error=float("nan"), damp=0.0, **t)


def _sequential_groups(block: nn.Module, linears: dict[str, nn.Module], run_block) -> list[list[str]]:
    """Linears in the order the forward pass reaches them; those reading the same tensor grouped."""
    # The input tensors themselves are kept (not their id()s): a freed tensor's id is reused.
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args[0])))
             for name, m in linears.items()]
    try:
        run_block(first_only=True)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen, last_input = set(), None
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    groups += [[name] for name in linears if name not in seen]  # never reached: quantize last
    return groups


@torch.no_grad()
def quantize_model(model: nn.Module, calibration, config: QuantConfig, progress: bool = True) -> nn.Module:
    """Quantize the Linear layers of ``model``'s transformer blocks in place; returns the model.

    ``calibration``: token ids [n_samples, seqlen] (LongTensor), or a list of tokenizer outputs
    (dicts with ``input_ids`` and optionally ``attention_mask``; padding is kept out of the
    Hessians). Unused for ``method="rtn"``. The output head and the embeddings stay dense; so does
    a Linear whose shape the packed format cannot hold (logged).
    """
    from .bnb import BnbConfig, quantize_model_bnb

    if isinstance(config, BnbConfig):  # round-to-nearest per block: no calibration
        return quantize_model_bnb(model, config, progress)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a BnbConfig, got {type(config).__name__}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("quantize_model: the model is already quantized (it holds QuantLinear layers)")
    blocks_name, blocks = find_blocks(model)
    was_training = model.training
    model.eval()  # no dropout while activations are collected
    try:
        _quantize_blocks(model, blocks_name, blocks, calibration, config, progress)
    finally:
        model.train(was_training)
    model.lightllm_quant_config = config  # what save_quantized writes
    return model


def _quantize_blocks(model, blocks_name, blocks, calibration, config: QuantConfig, progress: bool) -> None:
    device = next(model.parameters()).device
    start = time.perf_counter()
    if config.method == "rtn":
        for index, block in enumerate(tqdm(blocks, desc=f"RTN {config.bits}-bit", disable=not progress)):
            for name, linear in _block_linears(block, config, f"{blocks_name}.{index}").items():
                _replace(block, name, _quant_linear_from(linear, _rtn_result(linear, config), config))
        logger.info("RTN: %d blocks quantized to %d bits in %.1f s", len(blocks), config.bits, time.perf_counter() - start)
        return

    batches = _as_batches(calibration, device)
    inputs, block_args, masks = _capture_block_inputs(model, blocks, batches)
    tokens = sum(int(m.sum()) if m is not None else b["input_ids"].numel() for m, b in zip(masks, batches))
    logger.info("GPTQ: %d calibration sequences, %d tokens, %d blocks", len(batches) and sum(
        b["input_ids"].shape[0] for b in batches), tokens, len(blocks))

    for index, block in enumerate(tqdm(blocks, desc=f"GPTQ {config.bits}-bit", disable=not progress)):
        linears = _block_linears(block, config, f"{blocks_name}.{index}")
        kwargs_list = block_args[index]

        def run_block(first_only: bool = False, block=block):
            outs = []
            for x, (args, kw) in zip(inputs[:1] if first_only else inputs, kwargs_list):
                outs.append(_block_output(block(x, *args, **kw)))
            return outs

        groups = _sequential_groups(block, linears, run_block) if config.true_sequential else [list(linears)]
        for group in groups:
            accumulators = {name: HessianAccumulator(_in_features(linears[name]), device) for name in group}
            current_mask: list[torch.Tensor | None] = [None]

            def hook(mod, args, out, name):
                accumulators[name].add(args[0], current_mask[0])

            handles = [linears[name].register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
                       for name in group]
            try:
                for x, (args, kw), mask in zip(inputs, kwargs_list, masks):
                    current_mask[0] = mask
                    block(x, *args, **kw)
            finally:
                for h in handles:
                    h.remove()
            for name in group:
                linear = linears[name]
                if accumulators[name].tokens == 0:
                    logger.warning("%s.%d.%s never saw a calibration token: GPTQ sets its weights to zero",
                                   blocks_name, index, name)
                result = gptq_solve(_linear_weight(linear).detach(), accumulators[name].hessian, config.bits,
                                    config.group_size, config.sym, config.desc_act, config.static_groups,
                                    config.damp_percent, zero_min=config.zero_min)
                logger.debug("%s.%d.%s: GPTQ error %.4g", blocks_name, index, name, result.error)
                _replace(block, name, _quant_linear_from(linear, result, config))
                del accumulators[name]
        inputs = run_block()  # the quantized block's output feeds the next block
    logger.info("GPTQ: %d blocks quantized to %d bits in %.1f s", len(blocks), config.bits, time.perf_counter() - start)


def _block_linears(block: nn.Module, config: QuantConfig, where: str) -> dict[str, nn.Module]:
    """The block's Linear / Conv1D layers that the packed format can hold, by name in the block."""
    multiple, _ = gptq_format.values_per_chunk(config.bits)
    found = {}
    for name, module in block.named_modules():
        if not _is_linear(module):
            continue
        n, k = _linear_weight(module).shape
        if k % multiple or n % multiple:
            logger.warning("leaving %s.%s dense: %d-bit packing needs in and out features to be multiples of %d, got "
                           "%d x %d", where, name, config.bits, multiple, k, n)
            continue
        found[name] = module
    return found


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches):
    """Run the calibration batches through the model; keep the first block's input hidden states,
    the other arguments each block receives (masks, position embeddings, ...; they can differ per
    block, e.g. sliding-window and full-attention layers), and each batch's token mask.

    Returns ``(inputs, block_args, masks)``: ``inputs[b]`` the hidden states of batch b,
    ``block_args[i][b]`` = (positional args after the hidden states, keyword args) of block i.
    """
    inputs: list[torch.Tensor] = []
    block_args: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    masks: list[torch.Tensor | None] = []

    def grab(index):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                inputs.append(hidden)
            block_args[index].append((tuple(args[1:]), kwargs))  # e.g. GPT-2 passes its mask positionally
            if index == len(blocks) - 1:
                raise _StopForward  # nothing after the last block's arguments is needed
        return hook

    handles = [block.register_forward_pre_hook(grab(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            try:
                _forward_without_cache(model, batch)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward pass never reached its last transformer block")
            if any(len(args) != len(inputs) for args in block_args):
                raise RuntimeError("the model's forward pass skipped some of its transformer blocks")
            mask = batch.get("attention_mask")
            masks.append(mask.bool() if mask is not None else None)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, block_args, masks


def _forward_without_cache(model: nn.Module, batch: dict):
    try:
        return model(**batch, use_cache=False)
    except TypeError as exc:  # encoders without a cache reject the argument
        if "use_cache" not in str(exc):
            raise
        return model(**batch)


