"""When a call may skip its custom op's Python dispatch (about 6 us a call in eager mode)."""

from __future__ import annotations

import torch


def op_boundary_needed(*tensors: torch.Tensor | None) -> bool:
    """True when the call must go through the custom op: autograd, tracing or a dispatch mode."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._len_torch_dispatch_stack() > 0  # FakeTensorMode, FlopCounterMode, ...
    except AttributeError:  # a torch without this probe: stay on the safe side
        return True


def call_op(op, name: str, args: tuple, *tensors: torch.Tensor | None):
    """``op(*args)`` (a ``torch.ops.lightllm`` op), or the implementation the op would pick for ``name``
    on ``args[0]``'s device called directly when none of ``tensors`` needs the op boundary (see
    :func:`op_boundary_needed`): eager inference skips the custom op's Python dispatch."""
    if op_boundary_needed(*tensors):
        return op(*args)
    from ..backends import resolve

    return resolve(name, args[0].device)[1](*args)
