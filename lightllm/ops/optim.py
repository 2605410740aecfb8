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

from .. import _native, backends
from ..backends import register, resolve
from .blockwise import dequantize_blockwise_reference, quantize_blockwise_reference

OPTIMIZER_STEP = "optimizer_step"
ALGORITHMS = ("adam", "adamw", "lion", "sgd")
TWO_STATE = ("adam", "adamw")
BLOCKSIZE = 256


# ---- reference (pure PyTorch, any device) ---------------------------------------------------

def encode_state_reference(x: torch.Tensor, qmap: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 state -> (uint8 codes, absmax per 256): block-wise quantization (nearest map value),
    then for the momentum bitsandbytes' sign rule: a negative value whose code reached 0 or above
    moves down one code."""
    codes, absmax = quantize_blockwise_reference(x, qmap, BLOCKSIZE)
    if signed:
        codes = torch.where((x < 0) & (qmap[codes.long()] >= 0), codes - 1, codes)
    return codes, absmax


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
    # Checked here, before any backend: the kernels index these tensors unchecked.
    check_step_args(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2)
    _, impl = resolve(OPTIMIZER_STEP, params[0].device)
    impl(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr, beta1, beta2, eps,
         weight_decay, maximize, nesterov, grad_scale, found_inf)


@optimizer_step_op.register_fake
def _(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr, beta1, beta2, eps,
      weight_decay, maximize, nesterov, grad_scale, found_inf):
    return None


def check_step_args(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1=None, qmap2=None) -> None:
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
    for name, qmap in (("qmap1", qmap1), ("qmap2", qmap2)):
        if qmap is not None and (qmap.dtype != torch.float32 or qmap.shape != (256,) or qmap.device != params[0].device):
            raise ValueError(f"optimizer_step: {name} must be 256 float32 values on {params[0].device}, got "
                             f"{qmap.dtype} {tuple(qmap.shape)} on {qmap.device}")
    if len({p.data_ptr() for p in params if p.numel()}) != sum(1 for p in params if p.numel()):
        raise ValueError("optimizer_step: a parameter appears twice in one step (its two updates would race)")
    for i, p in enumerate(params):
        g = grads[i]
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16) or g.dtype not in (
                torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"optimizer_step: param {i} and its gradient must be float32, float16 or bfloat16, "
                             f"got {p.dtype} and {g.dtype}")
        if p.device != params[0].device:
            raise ValueError(f"optimizer_step: param {i} is on {p.device}, param 0 on {params[0].device}: one call "
                             "takes one device")
        if steps[i].numel() != 1 or steps[i].dtype != torch.float32 or steps[i].device != p.device:
            raise ValueError(f"optimizer_step: the step of param {i} must be one float32 value on {p.device}")
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(f"optimizer_step: param {i} is {tuple(p.shape)} on {p.device} but its gradient is "
                             f"{tuple(g.shape)} on {g.device}")
        if not p.is_contiguous() or not g.is_contiguous():
            raise ValueError(f"optimizer_step: param {i} and its gradient must be contiguous (row-major; "
                             "channels_last parameters are not supported)")
        if two and state1[i].dtype != state2[i].dtype:
            raise ValueError(f"optimizer_step: state1 and state2 of param {i} must both be 8-bit or both 32-bit, got "
                             f"{state1[i].dtype} and {state2[i].dtype}")
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
    _native.cpp_module().optimizer_step_cpu(
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

    def __init__(self, keep: int = 256):
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # least recent first
        self._captured: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # never evicted
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
        device = params[0].device
        key = (device, tuple(rows))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        hit = self._captured.get(key) or self._cache.pop(key, None)
        if hit is not None:
            if capturing:
                self._captured[key] = hit  # a graph now holds these addresses: keep them alive
            elif key not in self._captured:
                self._cache[key] = hit  # most recently used last
            return hit
        if capturing:
            raise RuntimeError("optimizer_step: capture a step in a CUDA graph only after one eager step with the "
                               "same parameters, gradients and state (its address tables are built then)")
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


def _gpu_step(launch, params, grads, state1, state2, absmax1, absmax2, steps, found_inf):
    """What the GPU backends share, per (dtype, state kind) bucket: the "gradient not finite" flags on
    the device (one multi-tensor reduction: the largest |g| is NaN or inf exactly when some value is;
    an empty tensor stands in as one zero), one launch, then the step counters. No host
    synchronization and no host-to-device copies once the tables are cached."""
    by_kind: dict[tuple, list[int]] = {}
    for i, (p, g, s) in enumerate(zip(params, grads, state1)):
        by_kind.setdefault((p.dtype, g.dtype, s.dtype), []).append(i)
    for members in by_kind.values():
        pick = (lambda xs: [xs[i] for i in members] if xs else [])  # noqa: E731
        subset = [pick(xs) for xs in (params, grads, state1, absmax1, state2, absmax2, steps)]
        probe = [g if g.numel() else g.new_zeros(1) for g in subset[1]]
        nonfinite = ~torch.isfinite(torch.stack(torch._foreach_norm(probe, float("inf"))))
        launch(_device_tables(*subset), nonfinite.to(torch.int32), subset)
        increment = (~nonfinite).to(torch.float32)
        if found_inf is not None:
            increment = increment * (found_inf.reshape(()) == 0).to(torch.float32)
        torch._foreach_add_(subset[6], list(increment.unbind(0)))


def _device_lr(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    if lr.device != device:
        raise ValueError(f"optimizer_step: lr must be on the parameters' device ({device}), got {lr.device}")
    return lr.to(torch.float32).reshape(1)


@register(OPTIMIZER_STEP, "triton", ("cuda", "cpu"))
def _optimizer_step_triton(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                           beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    from ..kernels import optim as triton_optim
    from .blockwise import _search_tables

    lr = _device_lr(lr, params[0].device)

    def launch(tables, skip, subset):
        p, g, s1 = subset[0], subset[1], subset[2]
        triton_optim.optimizer_step(algo, tables, skip, p, g, s1, qmap1, _search_tables(qmap1), qmap2,
                                    _search_tables(qmap2), lr, beta1, beta2, eps, weight_decay, maximize, nesterov,
                                    grad_scale, found_inf)

    _gpu_step(launch, params, grads, state1, state2, absmax1, absmax2, steps, found_inf)


@register(OPTIMIZER_STEP, "cuda", ("cuda",))
def _optimizer_step_cuda(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                         beta1, beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf):
    if any(g.dtype != p.dtype for p, g in zip(params, grads)):
        # The CUDA kernel reads gradients in the parameter's dtype; casting a float32 gradient to a
        # float16 parameter's dtype would overflow or underflow it. Mixed dtypes take the Triton
        # kernel (or the reference).
        fallback = _optimizer_step_triton if _triton_available() else optimizer_step_reference
        backends.note_handover(OPTIMIZER_STEP, "cuda", "triton" if _triton_available() else "torch",
                               "gradients in another dtype than their parameters")
        return fallback(algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr, beta1,
                        beta2, eps, weight_decay, maximize, nesterov, grad_scale, found_inf)
    native = _native.cuda_module()
    lr = _device_lr(lr, params[0].device)

    def launch(tables, skip, subset):
        table, work_tensor, work_block = tables
        native.optimizer_step_cuda(_ALGO_IDS[algo], table, work_tensor, work_block, skip, subset[0][0],
                                   subset[2][0].dtype == torch.uint8, qmap1, qmap2, lr, beta1, beta2, eps,
                                   weight_decay, maximize, nesterov, grad_scale, found_inf)

    _gpu_step(launch, params, grads, state1, state2, absmax1, absmax2, steps, found_inf)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
