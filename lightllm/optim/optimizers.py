"""8-bit (block-wise) and 32-bit optimizers: AdamW8bit, Adam8bit, Lion8bit, SGD8bit.

Drop-in replacements for torch.optim.AdamW / Adam / SGD(momentum) and bitsandbytes' 8-bit
optimizers. The state of a parameter with at least ``min_8bit_size`` elements is stored in 8 bits
(m on the signed dynamic map, v on the unsigned one, one float32 absmax per 256 values: 2.03 bytes
per parameter for Adam instead of 8); smaller tensors, and any with ``optim_bits=32``, keep float32
state. Every step is one fused op per (device, dtype, state kind) bucket of parameters
(``lightllm::optimizer_step``), so the update reads and writes each byte once.

Differences from bitsandbytes worth knowing: ``Adam8bit`` applies weight decay as L2 (added to the
gradient) like torch.optim.Adam, where bitsandbytes decouples it; the step count is a float32
tensor per parameter (as in torch), so a step can be captured in a CUDA graph.

FSDP2 (``fully_shard``, DTensor parameters): each rank updates its own shard, with state for that
shard only, 8-bit or 32-bit as the whole parameter's size decides (never the shard's); 8-bit blocks
are formed within the shard, so when shard boundaries fall on multiples of 256 elements the result is
the same as in one process. The state stays rank-local: save and load
``optimizer.state_dict()`` per rank; torch.distributed.checkpoint's optimizer-state functions are
not supported (the state is not a DTensor) and ``load_state_dict`` refuses their name-keyed dicts. Under DistributedDataParallel every rank
holds the whole state and updates identically.

Non-finite gradients: a parameter whose gradient holds a NaN or inf is not updated at all (value,
state and step stay as they were), so one bad value never poisons a whole block's absmax. With
torch.amp.GradScaler pass ``grad_scale`` / ``found_inf`` to ``step`` (GradScaler does this for
optimizers that accept them), and the whole step is skipped when ``found_inf`` is set.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..ops import optim as optim_ops
from ..ops.optim import BLOCKSIZE, TWO_STATE

_UNSUPPORTED_FLAGS = {
    "amsgrad": "amsgrad",
    "differentiable": "differentiable optimizer steps",
    "is_paged": "paged optimizer state",
}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2 parameters and gradients), else the tensor itself."""
    return t.to_local() if type(t).__name__ == "DTensor" and hasattr(t, "to_local") else t


class _ParamOverrides:
    """Per-parameter dicts keyed by the tensor's identity, without keeping it alive (a
    WeakKeyDictionary would compare tensors with ==, which is elementwise)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, dict]] = {}

    def setdefault(self, p: torch.Tensor) -> dict:
        entry = self._entries.get(id(p))
        if entry is None or entry[0]() is not p:
            self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
            entry = self._entries[id(p)] = (weakref.ref(p), {})
        return entry[1]

    def get(self, p: torch.Tensor) -> dict:
        entry = self._entries.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else {}


class GlobalOptimManager:
    """Per-parameter configuration overrides (bitsandbytes' GlobalOptimManager, same calls).

    ``GlobalOptimManager.get_instance().override_config(model.embed.weight, "optim_bits", 32)``
    keeps 32-bit state for that parameter in every lightllm optimizer created afterwards (or before
    its first step). Keys: ``optim_bits``, ``min_8bit_size``, ``lr``, ``betas``, ``eps``,
    ``weight_decay``.
    """

    _instance: "GlobalOptimManager | None" = None
    KEYS = ("optim_bits", "min_8bit_size", "lr", "betas", "eps", "weight_decay")

    def __init__(self):
        self._overrides = _ParamOverrides()

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def register_parameters(self, params) -> None:
        """Accepted for bitsandbytes compatibility; overrides are keyed by the parameter itself."""

    def override_config(self, parameters, key: str | None = None, value: Any = None,
                        key_value_dict: dict | None = None) -> None:
        updates = _override_updates(key, value, key_value_dict)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            self._overrides.setdefault(p).update(updates)

    def config_for(self, p: torch.Tensor) -> dict:
        return self._overrides.get(p)


def _override_updates(key: str | None, value: Any, key_value_dict: dict | None) -> dict:
    """override_config's arguments (bitsandbytes' calling conventions) as one checked dict."""
    updates = dict(key_value_dict or {})
    if key is not None:
        updates[key] = value
    unknown = set(updates) - set(GlobalOptimManager.KEYS)
    if unknown:
        raise ValueError(f"override_config: unknown keys {sorted(unknown)}; supported: {GlobalOptimManager.KEYS}")
    return updates


class BlockwiseOptimizer(torch.optim.Optimizer):
    """Base class; subclasses set ``algo`` ("adam", "adamw", "lion", "sgd")."""

    algo = ""
    # torch.amp.GradScaler hands such optimizers its scale and inf flag (as self.grad_scale /
    # self.found_inf) instead of unscaling the gradients and synchronizing on the flag itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 maximize: bool = False, optim_bits: int = 8, min_8bit_size: int = 4096, nesterov: bool = False,
                 percentile_clipping: int = 100, block_wise: bool = True, **flags):
        name = type(self).__name__
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if flags.pop(flag, False):
                raise ValueError(f"{name} does not support {what} ({flag}=True)")
        for flag in ("foreach", "fused", "capturable"):  # torch's implementation switches: ours is always all three
            flags.pop(flag, None)
        flags.pop("args", None)  # bitsandbytes' legacy config object
        if flags:
            raise TypeError(f"{name} got unexpected arguments: {sorted(flags)}")
        if percentile_clipping != 100:
            raise ValueError(f"{name} does not support percentile_clipping (got {percentile_clipping}; use "
                             "torch.nn.utils.clip_grad_norm_)")
        if not block_wise:
            raise ValueError(f"{name} always quantizes block-wise (block_wise=False is not supported)")
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be positive, got {min_8bit_size}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        optim_bits=optim_bits, min_8bit_size=min_8bit_size, nesterov=nesterov)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise TypeError(f"{name}: parameters must be float32, float16 or bfloat16, got {p.dtype} "
                                    f"of shape {tuple(p.shape)}")
        self._local_overrides = _ParamOverrides()
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lr_tensors: dict[tuple[int, torch.device], torch.Tensor] = {}
        # The code maps are made here, eagerly: a first step traced by torch.compile then finds them
        # instead of creating them inside its graph.
        for device in {_local(p).device for group in self.param_groups for p in group["params"]}:
            self._dynamic_maps(device)

    # ---- configuration ----------------------------------------------------------------------
    def override_config(self, param: torch.Tensor, key: str | None = None, value: Any = None,
                        key_value_dict: dict | None = None) -> None:
        """Per-parameter override for this optimizer (see :class:`GlobalOptimManager`). Takes
        effect when the parameter's state is created, i.e. before its first step."""
        self._local_overrides.setdefault(param).update(_override_updates(key, value, key_value_dict))

    def _config(self, p: torch.Tensor, group: dict) -> dict:
        config = {k: group[k] for k in GlobalOptimManager.KEYS}
        config.update(GlobalOptimManager.get_instance().config_for(p))
        config.update(self._local_overrides.get(p))
        return config

    def _dynamic_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            from ..functional import create_dynamic_map
            self._maps[device] = (create_dynamic_map(signed=True).to(device),
                                  create_dynamic_map(signed=False).to(device))
        return self._maps[device]

    def _init_state(self, param: torch.Tensor, config: dict) -> dict:
        state = self.state[param]
        p = _local(param)  # FSDP2: the state covers this rank's shard
        # 8-bit or 32-bit from the whole parameter's size (a DTensor's numel is the global one), so a
        # large weight sharded over many ranks keeps 8-bit state, as it would in one process
        eight_bit = config["optim_bits"] == 8 and param.numel() >= config["min_8bit_size"]
        qmap1, qmap2 = self._dynamic_maps(p.device)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        n_states = 2 if self.algo in TWO_STATE else 1
        for i in range(1, n_states + 1):
            if eight_bit:
                state[f"state{i}"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state[f"absmax{i}"] = torch.zeros(-(-p.numel() // BLOCKSIZE), dtype=torch.float32, device=p.device)
                state[f"qmap{i}"] = qmap1 if i == 1 else qmap2
            else:
                state[f"state{i}"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def _lr_tensor(self, group_index: int, group: dict, device: torch.device, config_lr) -> torch.Tensor:
        """The learning rate as a one-element float32 tensor on ``device`` (the kernels read it there).

        A float (or CPU tensor) is written into a cached device tensor with a fill kernel, no host
        synchronization; inside a captured CUDA graph that fill is frozen at capture time, so to change
        the learning rate between replays pass ``lr`` as a tensor on the device and update it in place.
        """
        lr = config_lr
        if isinstance(lr, torch.Tensor) and lr.device == device:
            return lr.to(torch.float32).reshape(())
        key = (group_index, device)
        t = self._lr_tensors.get(key)
        if t is None:
            t = self._lr_tensors[key] = torch.empty((), dtype=torch.float32, device=device)
        t.fill_(float(lr))  # a CPU tensor's value is read on the host: no device synchronization
        return t

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler.step
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        two_state = self.algo in TWO_STATE
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                config = self._config(p, group)
                state = self.state[p] if len(self.state[p]) else self._init_state(p, config)
                local, grad = _local(p), _local(p.grad)
                key = (local.device, (local.dtype, grad.dtype), state["state1"].dtype, config["lr"] if not isinstance(config["lr"], torch.Tensor)
                       else id(config["lr"]), tuple(config["betas"]), config["eps"], config["weight_decay"])
                buckets.setdefault(key, []).append((p, local, grad, state))
            for (device, _, _, _, betas, eps, weight_decay), members in buckets.items():
                qmap1, qmap2 = self._dynamic_maps(device)
                lr = self._lr_tensor(gi, group, device, self._config(members[0][0], group)["lr"])
                params = [local for _, local, _, _ in members]
                grads = [g if g.is_contiguous() else g.contiguous() for _, _, g, _ in members]
                empty = torch.empty(0, dtype=torch.float32, device=device)
                state1 = [s["state1"] for *_, s in members]
                absmax1 = [s.get("absmax1", empty) for *_, s in members]
                state2 = [s["state2"] for *_, s in members] if two_state else []
                absmax2 = [s.get("absmax2", empty) for *_, s in members] if two_state else []
                steps = [s["step"] for *_, s in members]
                torch.ops.lightllm.optimizer_step(
                    self.algo, params, grads, state1, state2, absmax1, absmax2, steps, qmap1, qmap2, lr,
                    float(betas[0]), float(betas[1]), float(eps), float(weight_decay), bool(group["maximize"]),
                    bool(group.get("nesterov", False)), grad_scale, found_inf)
        return loss

    # ---- state dicts ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads our own state dicts and bitsandbytes' (their quantized state nested under
        ``"__bnb_optimizer_quant_state__"``, their integer step). State tensors keep their dtype
        (torch's loader would cast float32 state to a float16 parameter's dtype)."""
        state_dict = dict(state_dict)
        incoming = {}
        for index in state_dict["state"]:
            if not isinstance(index, int) and not str(index).isdigit():
                raise ValueError(f"{type(self).__name__}.load_state_dict: state keys must be parameter indices, got "
                                 f"{index!r} (torch.distributed.checkpoint's name-keyed optimizer state dicts are not "
                                 "supported; save and load optimizer.state_dict() on each rank)")
        for index, entry in state_dict["state"].items():
            entry = dict(entry)
            nested = entry.pop("__bnb_optimizer_quant_state__", None)
            if nested is not None:
                entry.update(nested)
            if not isinstance(entry.get("step"), torch.Tensor):
                entry["step"] = torch.tensor(float(entry.get("step", 0)), dtype=torch.float32)
            incoming[index] = entry
        state_dict["state"] = incoming
        # Groups saved by another optimizer (bitsandbytes) lack some of our keys: keep ours for those.
        state_dict["param_groups"] = [{**{k: v for k, v in current.items() if k != "params"}, **saved}
                                      for current, saved in zip(self.param_groups, state_dict["param_groups"])]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in incoming.items():
            p = params[int(index)]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype if key != "step" else torch.float32,
                                                  copy=True)
            self._check_state(p, self.state[p], index)

    def _check_state(self, param: torch.Tensor, state: dict, index) -> None:
        p = _local(param)
        n_states = 2 if self.algo in TWO_STATE else 1
        for i in range(1, n_states + 1):
            s = state.get(f"state{i}")
            if s is None or s.numel() != p.numel():
                raise ValueError(f"{type(self).__name__}.load_state_dict: parameter {index} ({tuple(p.shape)}) has no "
                                 f"matching state{i} (got {None if s is None else tuple(s.shape)})")
            if s.dtype == torch.uint8:
                absmax = state.get(f"absmax{i}")
                if absmax is None or absmax.numel() != -(-p.numel() // BLOCKSIZE):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: 8-bit state{i} of parameter {index} "
                                     f"needs absmax{i} with one value per {BLOCKSIZE} elements")
                state[f"qmap{i}"] = self._dynamic_maps(p.device)[i - 1] if f"qmap{i}" not in state else state[f"qmap{i}"]

    # ---- conversion to and from torch's AdamW ---------------------------------------------------
    def dequantized_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``p`` in float32 (``exp_avg``, and ``exp_avg_sq`` for Adam; ``momentum_buffer``
        for SGD), as torch's optimizers name it, plus ``step``."""
        state = self.state[p]
        out = {"step": state["step"].clone()}
        names = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",),
                 "sgd": ("momentum_buffer",)}[self.algo]
        for i, name in enumerate(names, 1):
            s = state[f"state{i}"]
            if s.dtype == torch.uint8:
                out[name] = optim_ops._decode(s, state[f"absmax{i}"], state[f"qmap{i}"])
            else:
                out[name] = s.clone()
        return out

    def torch_state_dict(self) -> dict:
        """A state dict that torch.optim.AdamW / Adam / SGD loads (float32 state, dequantized)."""
        sd = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        sd["state"] = {i: self.dequantized_state(params[i]) for i in sd["state"]}
        for group in sd["param_groups"]:
            for key in ("optim_bits", "min_8bit_size"):
                group.pop(key, None)
        return sd

    @torch.no_grad()
    def load_torch_state_dict(self, state_dict: dict) -> None:
        """Take over the state of a torch.optim.AdamW / Adam / SGD (``exp_avg``, ``exp_avg_sq`` /
        ``momentum_buffer``), quantizing it for the parameters kept in 8 bits."""
        names = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",),
                 "sgd": ("momentum_buffer",)}[self.algo]
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for index, entry in state_dict["state"].items():
            p, group = params[int(index)]
            missing = [n for n in names if n not in entry]
            if missing:
                raise ValueError(f"load_torch_state_dict: parameter {index} has no {missing} in the torch state")
            state = self._init_state(p, self._config(p, group))
            # torch's SGD keeps no step; a momentum buffer means at least one step was taken (step 0
            # would make the next step reset the momentum to the gradient)
            state["step"].fill_(float(entry.get("step", 1 if self.algo == "sgd" else 0)))
            local = _local(p)
            for i, name in enumerate(names, 1):
                value = _local(entry[name]).to(device=local.device, dtype=torch.float32).reshape(local.shape)
                if state[f"state{i}"].dtype == torch.uint8:
                    codes, absmax = optim_ops.encode_state_reference(value, state[f"qmap{i}"], signed=i == 1)
                    state[f"state{i}"].copy_(codes)
                    state[f"absmax{i}"].copy_(absmax)
                else:
                    state[f"state{i}"].copy_(value)


class AdamW8bit(BlockwiseOptimizer):
    """torch.optim.AdamW with 8-bit block-wise state (``optim_bits=32`` for float32 state)."""

    algo = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False,
                 optim_bits=8, min_8bit_size=4096, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, maximize, optim_bits, min_8bit_size, **kwargs)


class Adam8bit(BlockwiseOptimizer):
    """torch.optim.Adam (L2 weight decay, added to the gradient) with 8-bit block-wise state."""

    algo = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 optim_bits=8, min_8bit_size=4096, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, maximize, optim_bits, min_8bit_size, **kwargs)


class Lion8bit(BlockwiseOptimizer):
    """Lion (sign of an interpolated momentum; decoupled weight decay) with 8-bit block-wise state."""

    algo = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, optim_bits=8,
                 min_8bit_size=4096, **kwargs):
        super().__init__(params, lr, betas, 0.0, weight_decay, maximize, optim_bits, min_8bit_size, **kwargs)


class SGD8bit(BlockwiseOptimizer):
    """torch.optim.SGD with momentum (dampening 0, optional Nesterov) and an 8-bit momentum buffer."""

    algo = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, nesterov=False, maximize=False,
                 optim_bits=8, min_8bit_size=4096, dampening=0.0, **kwargs):
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"SGD8bit stores a momentum buffer: momentum must lie in (0, 1), got {momentum} "
                             "(use torch.optim.SGD without momentum)")
        if dampening != 0:
            raise ValueError(f"SGD8bit does not support dampening (got {dampening})")
        super().__init__(params, lr, (momentum, 0.0), 0.0, weight_decay, maximize, optim_bits, min_8bit_size,
                         nesterov=nesterov, **kwargs)
