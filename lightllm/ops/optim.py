"""Op ``lightllm::optimizer_step``: one fused optimizer update for a list of parameters.

Algorithms (``algo``), per element, in float32 whatever the parameter dtype:

* ``"adamw"``: p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)                 (torch.optim.AdamW)
* ``"adam"``: as adamw but weight decay is L2, g += wd*p, as torch.optim.Adam does
* ``"lion"``: p *= 1 - lr*wd;  p -= lr * sign(b1 m + (1-b1) g);  m = b2 m + (1-b2) g
* ``"sgd"``:  g += wd*p;  m = g at t = 1, else b1 m + g;  p -= lr * (nesterov ? g + b1 m : m)
  (torch.optim.SGD with momentum b1, dampening 0)

g is the gradient divided by ``grad_scale`` when given, negated with ``maximize``.

State: per parameter, ``state1`` (m) and for Adam ``state2`` (v), each either float32 (32-bit
state) or uint8 codes with one float32 ``absmax`` per 256 elements (8-bit state: m on the signed
dynamic map ``qmap1``, v on the unsigned map ``qmap2``; after the update each block's new absmax is
taken and the values re-encoded to the nearest map entry; an m that is negative keeps a negative
code, as bitsandbytes does). ``steps`` holds each parameter's step count (float32 tensor).

Skipping: when ``found_inf`` (torch.amp.GradScaler's flag) is nonzero nothing changes. A
parameter whose gradient holds a NaN or inf is skipped alone: its value, state and step stay as
they were (never spreading the NaN through its blocks' absmax).
"""

from __future__ import annotations

import torch

from .. import _native
from ..backends import register, resolve
from .blockwise import _as_blocks, dequantize_blockwise_reference, midpoints

OPTIMIZER_STEP = "optimizer_step"
ALGORITHMS = ("adam", "adamw", "lion", "sgd")
TWO_STATE = ("adam", "adamw")
BLOCKSIZE = 256


# ---- reference (pure PyTorch, any device) ---------------------------------------------------

def encode_state_reference(x: torch.Tensor, qmap: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 state -> (uint8 codes, absmax per 256): nearest map value; negative values keep a
    negative code (bitsandbytes moves the index down one when rounding reached 0 or above)."""
    blocks = _as_blocks(x.reshape(-1), BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normalized = (blocks * inv[:, None]).reshape(-1)[: x.numel()]
    codes = torch.searchsorted(midpoints(qmap), normalized, right=False)
    if signed:
        codes = torch.where((x.reshape(-1) < 0) & (qmap[codes] >= 0), codes - 1, codes)
    return codes.to(torch.uint8).view(x.shape), absmax


def _decode(state: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    if state.dtype == torch.uint8:
        return dequantize_blockwise_reference(state, absmax, qmap, BLOCKSIZE, torch.float32)
    return state.clone()


def _store(state: torch.Tensor, absmax: torch.Tensor, value: torch.Tensor, qmap: torch.Tensor, signed: bool):
    if state.dtype == torch.uint8:
        codes, new_absmax = encode_state_reference(value, qmap, signed)
        state.copy_(codes)
        absmax.copy_(new_absmax)
    else:
        state.copy_(value)


def optimizer_step_reference(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                             beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    if found_inf is not None and bool(found_inf.item()):  # the reference may synchronize; kernels do not
        return
    lr = float(lr)
    for i, (p, g) in enumerate(zip(params, grads)):
        if not bool(torch.isfinite(g).all()):
            continue
        steps[i].add_(1)
        t = float(steps[i])
        g = g.float()
        if grad_scale is not None:
            g = g / grad_scale.float()
        if maximize:
            g = -g
        p32 = p.float()
        m = _decode(state1[i], absmax1[i], qmap1)
        if algo in ("adam", "sgd") and weight_decay != 0:
            g = g + weight_decay * p32
        if algo in ("adamw", "lion") and weight_decay != 0:
            p32 = p32 * (1 - lr * weight_decay)
        if algo in TWO_STATE:
            v = _decode(state2[i], absmax2[i], qmap2)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            denom = v.sqrt() / (1 - beta2**t) ** 0.5 + eps
            p32 = p32 - lr / (1 - beta1**t) * m / denom
            _store(state2[i], absmax2[i], v, qmap2, signed=False)
        elif algo == "lion":
            p32 = p32 - lr * torch.sign(beta1 * m + (1 - beta1) * g)
            m = beta2 * m + (1 - beta2) * g
        else:  # sgd with momentum
            m = g if t == 1 else beta1 * m + g
            p32 = p32 - lr * (g + beta1 * m if nesterov else m)
        _store(state1[i], absmax1[i], m, qmap1, signed=True)
        p.copy_(p32)


# ---- the custom op ----------------------------------------------------------------------------

@torch.library.custom_op("lightllm::optimizer_step",
                         mutates_args=("params", "state1", "state2", "absmax1", "absmax2", "steps"))
def optimizer_step_op(algo: str, params: list[torch.Tensor], grads: list[torch.Tensor], state1: list[torch.Tensor],
                      state2: list[torch.Tensor], absmax1: list[torch.Tensor], absmax2: list[torch.Tensor],
                      steps: list[torch.Tensor], qmap1: torch.Tensor, qmap2: torch.Tensor, lr: torch.Tensor,
                      beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool, nesterov: bool,
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    if not params:
        return
    _, impl = resolve(OPTIMIZER_STEP, params[0].device)
    impl(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr, beta1, beta2, eps,
         weight_decay, maximize, nesterov, grad_scale, found_inf)


@optimizer_step_op.register_fake
def _(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr, beta1, beta2, eps,
      weight_decay, maximize, nesterov, grad_scale, found_inf):
    return None


def check_step_args(algo, params, grads, state1, state2, absmax1, absmax2, steps) -> None:
    """Shapes, dtypes and devices of one call (the kernels index these tensors unchecked)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"optimizer_step: algo must be one of {ALGORITHMS}, got {algo!r}")
    n = len(params)
    two = algo in TWO_STATE
    lists = {"grads": grads, "state1": state1, "absmax1": absmax1, "steps": steps}
    if two:
        lists.update(state2=state2, absmax2=absmax2)
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"optimizer_step: {n} params but {len(values)} {name}")
    for i, p in enumerate(params):
        g = grads[i]
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(f"optimizer_step: param {i} is {tuple(p.shape)} on {p.device} but its gradient is "
                             f"{tuple(g.shape)} on {g.device}")
        if not p.is_contiguous() or not g.is_contiguous():
            raise ValueError(f"optimizer_step: param {i} and its gradient must be contiguous")
        for name, s, a in (("state1", state1[i], absmax1[i]),) + ((("state2", state2[i], absmax2[i]),) if two else ()):
            if s.numel() != p.numel() or s.device != p.device or not s.is_contiguous():
                raise ValueError(f"optimizer_step: {name} of param {i} must be contiguous with {p.numel()} elements "
                                 f"on {p.device}, got {tuple(s.shape)} on {s.device}")
            if s.dtype == torch.uint8:
                blocks = -(-p.numel() // BLOCKSIZE)
                if a.numel() != blocks or a.dtype != torch.float32:
                    raise ValueError(f"optimizer_step: 8-bit {name} of param {i} needs a float32 absmax of {blocks} "
                                     f"elements, got {a.dtype} with {a.numel()}")
            elif s.dtype != torch.float32:
                raise ValueError(f"optimizer_step: {name} of param {i} must be uint8 (8-bit) or float32, got {s.dtype}")


# ---- backend implementations ------------------------------------------------------------------

register(OPTIMIZER_STEP, "torch", ("cpu", "cuda"))(optimizer_step_reference)

_ALGO_IDS = {name: i for i, name in enumerate(ALGORITHMS)}


@register(OPTIMIZER_STEP, "cpp", ("cpu",))
def _optimizer_step_cpp(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                        beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    two = algo in TWO_STATE
    empty = params[0].new_empty(0, dtype=torch.float32)
    _native.native_module().optimizer_step_cpu(
        _ALGO_IDS[algo], params, grads, state1, state2 if two else [empty] * len(params),
        absmax1, absmax2 if two else [empty] * len(params), steps, qmap1, qmap2, lr, beta1, beta2, eps,
        weight_decay, maximize, nesterov, grad_scale, found_inf)


class _DeviceTables:
    """Per-tensor tables for the GPU kernels, cached by the tensors' addresses.

    ``table``: int64 [n, 9] (param, grad, state1, absmax1, state2, absmax2, step addresses, numel,
    16-byte aligned), the layout of csrc/optim.h's OptimDeviceTensor; ``work_tensor`` /
    ``work_block``: int32, one entry per 256-value block. Built on the host and copied without
    synchronizing (pinned memory); reused while the addresses stay the same, so a step captured in
    a CUDA graph (after one eager step) does no host work and reads tables that stay valid.
    """

    def __init__(self, keep: int = 16):
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._keep = keep

    def __call__(self, params, grads, state1, absmax1, state2, absmax2, steps):
        rows = []
        for i, p in enumerate(params):
            pointers = [p.data_ptr(), grads[i].data_ptr(), state1[i].data_ptr(),
                        absmax1[i].data_ptr() if absmax1 and absmax1[i].numel() else 0,
                        state2[i].data_ptr() if state2 else 0,
                        absmax2[i].data_ptr() if absmax2 and absmax2[i].numel() else 0, steps[i].data_ptr()]
            aligned = all(ptr % 16 == 0 for ptr in pointers)
            rows.append((*pointers, p.numel(), int(aligned)))
        key = (params[0].device, tuple(rows))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        device = params[0].device
        blocks = torch.tensor([-(-p.numel() // BLOCKSIZE) for p in params])
        host = (torch.tensor(rows, dtype=torch.int64),
                torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), blocks),
                torch.cat([torch.arange(int(b), dtype=torch.int32) for b in blocks]))
        if device.type == "cuda":
            tables = tuple(t.pin_memory().to(device, non_blocking=True) for t in host)
        else:
            tables = host
        if len(self._cache) >= self._keep:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = tables
        return tables


_device_tables = _DeviceTables()


def _gpu_step(launch, algo, params, grads, state1, state2, absmax1, absmax2, steps, found_inf):
    """What the GPU backends share: per-parameter non-finite flags on the device (one multi-tensor
    reduction: the largest |g| is NaN or inf exactly when some value is), one launch per
    (dtype, state kind), then the step counters, all without synchronizing with the host."""
    filled = [i for i, g in enumerate(grads) if g.numel()]
    if len(filled) == len(grads):
        nonfinite = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
    else:  # empty tensors have no max norm; they are finite by definition (and have no blocks)
        nonfinite = torch.zeros(len(grads), dtype=torch.bool, device=grads[0].device)
        if filled:
            nonfinite[filled] = ~torch.isfinite(torch.stack(torch._foreach_norm([grads[i] for i in filled],
                                                                                  float("inf"))))
    skip = nonfinite.to(torch.int32)
    by_kind: dict[tuple, list[int]] = {}
    for i, (p, g, s) in enumerate(zip(params, grads, state1)):
        by_kind.setdefault((p.dtype, g.dtype, s.dtype), []).append(i)
    for members in by_kind.values():
        pick = (lambda xs: [xs[i] for i in members] if xs else [])  # noqa: E731
        subset = [pick(xs) for xs in (params, grads, state1, absmax1, state2, absmax2, steps)]
        tables = _device_tables(*subset)
        launch(tables, skip if len(members) == len(params) else skip[members].contiguous(), subset)
    increment = (~nonfinite).to(torch.float32)
    if found_inf is not None:
        increment = increment * (found_inf.reshape(()) == 0).to(torch.float32)
    torch._foreach_add_(steps, list(increment.unbind(0)))


@register(OPTIMIZER_STEP, "triton", ("cuda", "cpu"))
def _optimizer_step_triton(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                           beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    from ..kernels import optim as triton_optim
    from .blockwise import _search_tables

    lr = lr.to(device=params[0].device, dtype=torch.float32).reshape(1)

    def launch(tables, skip, subset):
        p, g, s1 = subset[0], subset[1], subset[2]
        triton_optim.optimizer_step(algo, tables, skip, p, g, s1, qmap1, _search_tables(qmap1), qmap2,
                                    _search_tables(qmap2), lr, beta1, beta2, eps, weight_decay, maximize, nesterov,
                                    grad_scale, found_inf)

    _gpu_step(launch, algo, params, grads, state1, state2, absmax1, absmax2, steps, found_inf)


@register(OPTIMIZER_STEP, "cuda", ("cuda",))
def _optimizer_step_cuda(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                         beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    native = _native.native_module()
    lr = lr.to(device=params[0].device, dtype=torch.float32).reshape(1)
    # The CUDA kernel reads gradients in the parameter's dtype.
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]

    def launch(tables, skip, subset):
        table, work_tensor, work_block = tables
        native.optimizer_step_cuda(_ALGO_IDS[algo], table, work_tensor, work_block, skip, subset[0][0],
                                   subset[2][0].dtype == torch.uint8, qmap1, qmap2, lr, beta1, beta2, eps,
                                   weight_decay, maximize, nesterov, grad_scale, found_inf)

    _gpu_step(launch, algo, params, grads, state1, state2, absmax1, absmax2, steps, found_inf)
