"""GPTQ's calibrated walk over a model, block by block (as GPTQ-for-LLaMa and AutoGPTQ do it):

1. the transformer blocks and their Linears come from the shared walk
   (:func:`lightllm.quantization.core.quantization_units`);
2. run the calibration set through the model up to the first block and keep the block's inputs
   (hidden states and the keyword arguments the model passes: masks, position embeddings);
3. for each block: record the Hessian of every Linear's input with forward hooks, solve, replace
   each Linear by a :class:`~lightllm.nn.QuantLinear` (the shared ``replace_module``), then
   recompute the block's output from the quantized block: it is the next block's input. With
   ``true_sequential`` the Linears of a block are quantized in the order the forward pass reaches
   them (layers that read the same tensor, such as q/k/v, together), each group seeing the outputs
   of the groups already quantized.

Only the current block's inputs and outputs are held, besides the calibration token ids.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import IN_MEMORY, QuantizationUnit, Residency, linear_weight, replace_module
from ..core import LayerListNotFoundError, find_blocks  # noqa: F401  (the old lightllm.quantization.model names)
from .config import METHODS, QuantConfig  # noqa: F401  (idem)
from .solver import GPTQResult, HessianAccumulator, gptq_solve

logger = logging.getLogger("lightllm")


def _in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


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


def _quant_linear_from(linear: nn.Module, result: GPTQResult, config) -> nn.Module:
    return config.layer_type.from_quantized(result.q, result.zeros, result.scales, result.g_idx, config.bits,
                                      config.group_size, linear.bias, config.checkpoint_format)


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


def quantize_model(model: nn.Module, calibration, config, progress: bool = True) -> nn.Module:
    """``quantize_(model, config, calibration)``: the name this function had before every method
    shared one API (kept for existing code)."""
    from ..core import quantize_

    return quantize_(model, config, calibration, progress=progress)


def quantize_blocks_gptq(model: nn.Module, units: list[QuantizationUnit], calibration, config,
                         progress: bool, residency: Residency | None = None) -> int:
    """GPTQ over ``units`` (the transformer blocks, in order); the count of layers replaced.
    ``residency`` brings each block in before it is quantized and lets it go after its output has
    been computed (default: the model stays where it is)."""
    residency = residency or IN_MEMORY
    device = residency.device(model)
    start = time.perf_counter()
    batches = _as_batches(calibration, device)
    with residency.capturing(units) as blocks:
        inputs, block_args, masks = _capture_block_inputs(model, blocks, batches)
    n_blocks = len(blocks)
    del blocks
    tokens = sum(int(m.sum()) if m is not None else b["input_ids"].numel() for m, b in zip(masks, batches))
    logger.info("GPTQ: %d calibration sequences, %d tokens, %d blocks", len(batches) and sum(
        b["input_ids"].shape[0] for b in batches), tokens, n_blocks)

    replaced = 0
    for unit in tqdm(units, desc=f"GPTQ {config.bits}-bit", disable=not progress):
        residency.load(unit)
        block, linears = unit.module, unit.linears
        kwargs_list = block_args[unit.index]

        def run_block(first_only: bool = False):
            # looked up each time: when the block is itself a Linear, replacing it replaces the block
            block = model.get_submodule(unit.prefix)
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
                    logger.warning("%s never saw a calibration token: GPTQ sets its weights to zero",
                                   unit.qualified(name))
                result = gptq_solve(linear_weight(linear).detach(), accumulators[name].hessian, config.bits,
                                    config.group_size, config.sym, config.desc_act, config.static_groups,
                                    config.damp_percent, zero_min=config.zero_min)
                logger.debug("%s: GPTQ error %.4g", unit.qualified(name), result.error)
                replace_module(model, unit.qualified(name), _quant_linear_from(linear, result, config))
                replaced += 1
                del accumulators[name]
        inputs = run_block()  # the quantized block's output feeds the next block
        del block, linears, run_block, groups
        residency.release(unit)
    logger.info("GPTQ: %d blocks quantized to %d bits in %.1f s", n_blocks, config.bits, time.perf_counter() - start)
    return replaced


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


