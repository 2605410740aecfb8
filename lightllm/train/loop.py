"""The fine-tuning loop, on Accelerate: ``finetune(FinetuneConfig(...))``.

One optimizer step takes ``batch_size`` records in all (every process together), in micro-batches
of ``micro_batch_size`` per process; the records of step s are the s-th slice of a seeded epoch
order (length-grouped), split between the processes, so the data order depends only on the seed
and the step, and a resumed run reads exactly what the uninterrupted one would. The loss is the
mean over every target token of the whole step (collate.py): the step's target tokens are counted
first (and summed over the processes), then every micro-batch adds its summed token loss over that
count; under DDP, whose gradient is the mean over processes, each process scales its part by the
process count, so the gradient is the same as one process with the same global batch. The
scheduler steps once per optimizer step, whatever the process count.

``fsdp=True`` shards with torch's FSDP2 (``fully_shard`` on every decoder layer, then on the whole
model) instead of DDP: parameters, gradients and optimizer state are split between the processes
and gathered layer by layer for the forward and backward passes. The gradient FSDP2 reduce-scatters
is the mean over processes, as DDP's, so the loss scaling and the result are the same. Parameters
are sharded, buffers are not: a GPTQ base's packed weights (buffers of QuantLinear) stay whole on
every process and only the LoRA weights (and the norms and embeddings) are split, which trains
exactly as one process does. Checkpoints hold the gathered trainable parameters and each process's
own optimizer shard, so an FSDP run resumes with the same number of processes. What it does not save
yet: every process loads the whole model before sharding it, and at the end every layer is gathered
on every process to write the outputs, so the model must still fit one device (the optimizer state
and gradients are what is split). The gradient is reduce-scattered on every micro-batch.

Methods: ``lora``, ``qlora`` (LoRA on a 4-bit GPTQ/RTN base: quantized first, or a GPTQ checkpoint
loaded as is), ``adapter`` (a placement or preset), ``prefix``, ``prompt``, ``p-tuning``, ``full``.
Optimizers: lightllm's AdamW8bit by default, or any lightllm or torch.optim optimizer by name.
Checkpoints (trainable parameters, optimizer, scheduler, every process's RNG, the step) are written
atomically every ``save_steps`` and at the end, the last ``save_total_limit`` kept; ``resume``
continues from the newest complete one. The trained adapter is saved in its method's format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import shutil
import tempfile
import time
from typing import Any

import torch

from .collate import Collator, count_target_tokens, length_grouped_order, token_loss_sum
from .data import math_task, read_records, tokenize_record
from .templates import get_template

logger = logging.getLogger("lightllm")

METHODS = ("lora", "qlora", "adapter", "prefix", "prompt", "p-tuning", "full")
LIGHTLLM_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "lion8bit": "Lion8bit", "sgd8bit": "SGD8bit"}
TORCH_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "adafactor": "Adafactor", "rmsprop": "RMSprop"}
CHECKPOINT_PREFIX = "checkpoint-"


@dataclasses.dataclass
class FinetuneConfig:
    """Everything a run needs; the CLI's flags have the same names."""

    output_dir: str
    model: str | None = None  # a Hugging Face folder or GPTQ checkpoint, or a hub id (default: the embedded model)
    revision: str | None = None  # model as a hub id: branch, tag or commit (default main)
    subfolder: str | None = None  # the model's folder inside model
    method: str = "lora"
    data: list[str] | None = None  # JSON/JSONL files (default: the embedded math task's training split)
    template: str | None = None  # alpaca (default), qa, or a JSON file
    cutoff_len: int = 256
    train_on_inputs: bool = False
    # the method
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    adapter: str = "series"  # series, parallel (LLM-Adapters), houlsby, pfeiffer, parallel-he (presets)
    bottleneck_size: int = 64
    num_virtual_tokens: int = 16
    quant_bits: int = 4
    quant_method: str = "rtn"  # qlora on a dense model: how to quantize it first (rtn or gptq)
    quant_group_size: int = 32
    # optimization
    optimizer: str = "adamw8bit"
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine, linear, constant (after warmup)
    warmup_steps: int = 0
    batch_size: int = 32  # records per optimizer step, all processes together
    micro_batch_size: int = 8  # records per forward pass and process
    max_steps: int = 100
    stop_after: int | None = None  # stop after this step, the schedule still spanning max_steps (a run in parts)
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no, bf16, fp16
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    group_by_length: bool = True
    seed: int = 0
    # outputs
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2
    resume: bool = False
    log_steps: int = 10
    merge: bool = False  # lora: also write the merged model
    cpu: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.optimizer.lower() not in LIGHTLLM_OPTIMIZERS and self.optimizer.lower() not in TORCH_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join([*LIGHTLLM_OPTIMIZERS, *TORCH_OPTIMIZERS])}, "
                             f"got {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "micro_batch_size", "max_steps", "save_total_limit", "log_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.stop_after is not None and not (isinstance(self.stop_after, int) and self.stop_after >= 1):
            raise ValueError(f"stop_after must be an integer >= 1, got {self.stop_after!r}")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            raise ValueError(f"save_steps must be an integer >= 0 (0: only at the end), got {self.save_steps!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("fsdp with mixed_precision fp16 is not supported (its GradScaler is not built for sharded "
                             "gradients here): use bf16")


@dataclasses.dataclass
class FinetuneResult:
    model: Any  # the trained (wrapped) model; after an FSDP run still sharded by FSDP: run it on every process together
    tokenizer: Any
    log: list[dict[str, Any]]
    adapter_dir: pathlib.Path | None
    steps: int
    seconds: float  # the training loop with its checkpoints (not loading, quantizing or the final outputs)
    peak_memory_bytes: int | None = None  # see PeakMemory
    memory_before_bytes: int | None = None  # the same measure when the loop started (model and data loaded)


# ---- building blocks -----------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while the block runs: on CUDA the allocator's peak (torch.cuda.max_memory_allocated);
    on the CPU the process's resident set, sampled every 10 ms by a thread (it includes the
    interpreter, the libraries and the model: compare runs made in fresh processes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.start = device, None, None

    def __enter__(self):
        import threading

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self._stop = threading.Event()
        self.peak = self.start = _resident_bytes()

        def sample():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, _resident_bytes())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _resident_bytes())
        return False


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far, from getrusage where it exists
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except ImportError:
            return 0


def method_config(config: FinetuneConfig):
    """The tuning config of the run's method (None for full fine-tuning)."""
    from ..tuning import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if config.method in ("lora", "qlora"):
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules, task_type="CAUSAL_LM")
    if config.method == "adapter":
        presets = {"houlsby": "houlsby", "pfeiffer": "pfeiffer", "parallel-he": "parallel"}
        if config.adapter in presets:
            return AdapterConfig.from_preset(presets[config.adapter])
        if config.adapter == "series":
            return AdapterConfig(bottleneck_size=config.bottleneck_size, init_weights="mam_adapter")
        if config.adapter == "parallel":
            return AdapterConfig(bottleneck_size=config.bottleneck_size, use_parallel_adapter=True,
                                 init_weights="mam_adapter")
        raise ValueError(f"adapter must be series, parallel, houlsby, pfeiffer or parallel-he, got {config.adapter!r}")
    if config.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=True,
                                  init_weights="zero")
    if config.method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB")
    if config.method == "p-tuning":
        return PromptEncoderConfig(num_virtual_tokens=config.num_virtual_tokens)
    return None


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    key = name.lower()
    if key in LIGHTLLM_OPTIMIZERS:
        from .. import optim

        cls = getattr(optim, LIGHTLLM_OPTIMIZERS[key])
    else:
        cls = getattr(torch.optim, TORCH_OPTIMIZERS[key])
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then cosine or linear decay to 0 at ``total`` (or constant)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return factor


def _check_output_dir(path: pathlib.Path, needed_bytes: int) -> None:
    """Fail before training when the output cannot be written: a path that is a file, a folder not
    writable, or a disk without room for two checkpoints."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} is a file")
    path.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise ValueError(f"output_dir {path} is not writable: {e}") from None
    free = shutil.disk_usage(path).free
    if free < 2 * needed_bytes:
        raise ValueError(f"output_dir {path} has {free / 2**20:.0f} MiB free; checkpoints need about "
                         f"{2 * needed_bytes / 2**20:.0f} MiB")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(output_dir: pathlib.Path) -> list[pathlib.Path]:
    found = [p for p in output_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# ---- FSDP2 ------------------------------------------------------------------------------------------

def _check_fsdp_available() -> None:
    import inspect

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import distribute_tensor
    except ImportError:
        distribute_tensor = None
    # src_data_rank (each process keeps its own copy when loading a checkpoint) came with torch 2.7
    if distribute_tensor is None or "src_data_rank" not in inspect.signature(distribute_tensor).parameters:
        raise ValueError(f"fsdp needs torch's FSDP2 as in torch >= 2.7, this is torch {torch.__version__}")


def shard_with_fsdp2(model: torch.nn.Module, device: torch.device, processes: int) -> None:
    """``fully_shard`` every decoder layer (the classes the model names in ``_no_split_modules``, the
    rule Accelerate's transformer wrap policy uses), then the whole model (embeddings, final norm,
    head and a prompt method's encoder form the root group). The mesh is on the run's device type:
    FSDP's default would pick the GPU whenever one exists, even for a run asked to use the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unshard_all(model: torch.nn.Module) -> None:
    """Gather every FSDP group's parameters (all processes take part): afterwards the model's
    parameters are whole tensors, to save or to run."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter whole (a collective for a sharded one)."""
    return p.full_tensor() if _is_dtensor(p) else p


def _copy_whole_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded (each process keeps its own part) or not."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)  # every process read the file: no communication
    param.copy_(value)


def _local_optimizer_state(optimizer) -> dict[str, Any]:
    """This process's optimizer state with sharded tensors as their local parts, and where they were
    (torch's optimizers keep DTensor state for DTensor parameters; lightllm's keep local tensors)."""
    saved = optimizer.state_dict()
    sharded_entries = []
    for index, entry in list(saved["state"].items()):
        entry = saved["state"][index] = dict(entry)  # state_dict() shares these dicts with the live state
        for key, value in entry.items():
            if _is_dtensor(value):
                entry[key] = value.to_local()
                sharded_entries.append((index, key))
    return {"state_dict": saved, "sharded_entries": sharded_entries}


def _load_local_optimizer_state(optimizer, saved: dict[str, Any]) -> None:
    """The inverse of _local_optimizer_state: load, then wrap the entries that were sharded back into
    DTensors laid out as their parameters."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(saved["state_dict"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state
    for index, key in saved["sharded_entries"]:
        p = params[index]
        local = state[p][key]
        state[p][key] = DTensor.from_local(local.to(p.device), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())


# ---- the run ---------------------------------------------------------------------------------------

def _make_accelerator(config: FinetuneConfig):
    """An Accelerator for the run. Accelerate keeps its state per process; a second run in the same
    single process with another precision or device (a notebook, the tests) resets that state
    instead of failing. Under a launcher (several processes) the launcher's settings stand."""
    from .._extras import require

    require("accelerate", "lightllm finetune (lightllm.train.loop)")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = config.cpu or not torch.cuda.is_available()
    try:
        return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    except ValueError as e:
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)


def finetune(config: FinetuneConfig, accelerator=None) -> FinetuneResult:
    """Train ``config.method`` on the data and save the adapter; see the module docstring."""
    from ..models import load_model
    from ..tuning import get_peft_model, prepare_model_for_kbit_training

    if accelerator is None:
        accelerator = _make_accelerator(config)
    elif str(getattr(accelerator, "mixed_precision", config.mixed_precision)) != config.mixed_precision:
        raise ValueError(f"the Accelerator given runs mixed_precision {accelerator.mixed_precision!r} but the config "
                         f"asks for {config.mixed_precision!r}: make them agree")
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    if kind.endswith("FSDP"):
        # Refused before anything loads: Accelerate's FSDP wrapping would shard the model by its own
        # policy around lightllm's (the tuned layers, the packed quantized weights), untested here.
        raise ValueError("lightllm finetune shards with FSDP2 itself: launch without Accelerate's FSDP config "
                         "(accelerate launch / torchrun) and pass --fsdp (FinetuneConfig(fsdp=True))")
    if kind.endswith("DEEPSPEED"):
        raise ValueError("lightllm finetune does not run under DeepSpeed: use DDP (accelerate launch / torchrun "
                         "without a DeepSpeed config) or --fsdp to shard the model over the processes")
    if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(f"the Accelerator accumulates gradients over {accelerator.gradient_accumulation_steps} steps "
                         "(--gradient_accumulation_steps or ACCELERATE_GRADIENT_ACCUMULATION_STEPS): it would divide "
                         "lightllm's token-weighted loss again; set it to 1 and use micro_batch_size instead")
    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = config.fsdp and world > 1
    if config.fsdp and world == 1:
        logger.warning("fsdp: one process, nothing to shard; training unsharded")
    if sharded:
        _check_fsdp_available()
    if config.batch_size % (config.micro_batch_size * world):
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size x processes = "
                         f"{config.micro_batch_size} x {world}")
    output_dir = pathlib.Path(config.output_dir)
    earlier = _checkpoints(output_dir) if output_dir.is_dir() else []
    if earlier and not config.resume:  # rotation would delete them and a later resume pick them up
        raise ValueError(f"output_dir {output_dir} holds checkpoints of an earlier run ({earlier[-1].name}): pass "
                         "resume to continue it, or choose another output_dir")
    if earlier:
        check_same_run(earlier[-1], config)
    template = get_template(config.template)
    records = read_records(config.data) if config.data else math_task("train", seed=config.seed)

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, device=accelerator.device, dtype=torch.float32,
                                  revision=config.revision, subfolder=config.subfolder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    items = [tokenize_record(r, tokenizer, template, config.cutoff_len, config.train_on_inputs) for r in records]
    items = [t for t in items if any(label != -100 for label in t.labels[1:])]  # nothing to learn from the rest
    if len(items) < config.batch_size:
        raise ValueError(f"{len(items)} usable records, fewer than one batch of {config.batch_size}")

    if config.method == "qlora":
        from ..nn import QuantLinear
        from ..quantization import make_config, quantize_

        if not any(isinstance(m, QuantLinear) for m in model.modules()):
            if sharded and config.merge:  # the merge reloads the base on one process: it must be a checkpoint
                raise ValueError("qlora with fsdp and merge needs a GPTQ checkpoint as the base (--model): a base "
                                 "quantized during the run cannot be rebuilt for the merge; quantize it first "
                                 "(lightllm quantize) or merge later in one process")
            calib = [torch.tensor([t.input_ids], device=accelerator.device) for t in items[:64]]
            quant_config = make_config(config.quant_method, bits=config.quant_bits, group_size=config.quant_group_size)
            quantize_(model, quant_config, [{"input_ids": c} for c in calib] if quant_config.needs_calibration else None,
                      progress=False)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    tuning = method_config(config)
    torch.manual_seed(config.seed)  # the same adapter initialization in every process
    wrapped = model if tuning is None else get_peft_model(model, tuning)
    if tuning is None:
        for p in wrapped.parameters():
            p.requires_grad_(True)
    _check_output_dir(output_dir, sum(p.numel() for p in _trainable(wrapped).values()) * 12 + (1 << 20))
    if sharded:
        shard_with_fsdp2(wrapped, accelerator.device, world)  # before the optimizer: it must hold the sharded parameters
    trainable = _trainable(wrapped)

    optimizer = build_optimizer(config.optimizer, list(trainable.values()), config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, config.warmup_steps,
                                                                       config.max_steps))
    wrapped.train()
    if sharded:  # FSDP2 does the communication; Accelerate wraps the optimizer for mixed precision
        engine, optimizer = wrapped, accelerator.prepare(optimizer)
    else:
        engine, optimizer = accelerator.prepare(wrapped, optimizer)  # DDP (or nothing) + mixed precision

    state = {"step": 0, "log": [], "tokens": 0}
    found = _checkpoints(output_dir)
    if config.resume:
        if found:
            _load_checkpoint(found[-1], wrapped, optimizer, scheduler, state, rank, accelerator, sharded)
            logger.info("resumed from %s at step %d", found[-1], state["step"])
        else:
            logger.info("no checkpoint in %s: starting from step 0", output_dir)

    lengths = [len(t.input_ids) for t in items]
    collate = Collator(tokenizer.pad_token_id)
    steps_per_epoch = len(items) // config.batch_size
    accumulation = config.batch_size // (config.micro_batch_size * world)

    def records_of_step(step: int) -> list[int]:
        epoch, index = divmod(step, steps_per_epoch)
        order = (length_grouped_order(lengths, config.batch_size, seed=config.seed * 100003 + epoch)
                 if config.group_by_length else random.Random(config.seed * 100003 + epoch).sample(range(len(items)),
                                                                                                   len(items)))
        chunk = order[index * config.batch_size:(index + 1) * config.batch_size]
        return chunk[rank::world]

    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, initial=state["step"], desc=f"finetune {config.method}",
               disable=not (config.progress and accelerator.is_main_process))
    started = time.perf_counter()
    window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
    with PeakMemory(accelerator.device) as memory:
        try:
            stop = min(config.max_steps, config.stop_after or config.max_steps)
            while state["step"] < stop:
                mine = records_of_step(state["step"])
                micro = [collate([items[i] for i in mine[j:j + config.micro_batch_size]])
                         for j in range(0, len(mine), config.micro_batch_size)]
                assert len(micro) == accumulation
                counted = torch.tensor([float(sum(count_target_tokens(b["labels"]) for b in micro))],
                                       device=accelerator.device)
                total = float(accelerator.reduce(counted, reduction="sum")) if world > 1 else float(counted)
                step_loss = torch.zeros((), device=accelerator.device)
                for j, batch in enumerate(micro):
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    sync = j == len(micro) - 1
                    context = (accelerator.no_sync(engine) if not sync and world > 1 and not sharded
                               else contextlib.nullcontext())
                    with context, accelerator.autocast():
                        logits = engine(**batch).logits
                        loss_sum = token_loss_sum(logits, labels)
                        accelerator.backward(loss_sum * (world / total))
                    step_loss += loss_sum.detach()
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
                optimizer.step()
                if not getattr(optimizer, "step_was_skipped", False):  # fp16: an overflow skips the step
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(accelerator.reduce(step_loss, reduction="sum")) / total if world > 1 else \
                    float(step_loss) / total
                state["step"] += 1
                state["tokens"] += int(total)
                window_loss += step_loss
                window_tokens += int(total)
                window_steps += 1
                bar.update(1)
                if state["step"] % config.log_steps == 0 or state["step"] == stop:
                    elapsed = time.perf_counter() - window_start
                    entry = {"step": state["step"], "loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                             "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    state["log"].append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
                    window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
                if (config.save_steps and state["step"] % config.save_steps == 0) or state["step"] == stop:
                    _save_checkpoint(output_dir, wrapped, optimizer, scheduler, state, accelerator, config, sharded)
        finally:
            bar.close()
    seconds = time.perf_counter() - started
    whole_state = None
    if sharded:  # collectives, every process: the outputs are written whole
        if config.method == "full":  # FSDP's state_dict() gives shards: gather the whole one on rank 0
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            whole_state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            # tied weights come back as separate copies: keep one name per shared parameter, as
            # save_pretrained would (the others are re-tied on load)
            first_name: dict[int, str] = {}
            for name, param in wrapped.named_parameters(remove_duplicate=False):
                if first_name.setdefault(id(param), name) != name:
                    whole_state.pop(name, None)
        unshard_all(wrapped)
    adapter_dir, failure = None, None
    if accelerator.is_main_process and state["step"] >= config.max_steps:
        try:
            adapter_dir = _save_outputs(output_dir, wrapped, tokenizer, state["log"], config, whole_state, sharded)
        except Exception as e:  # the other processes wait at the barrier below: release them, then raise
            failure = e
    accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    return FinetuneResult(wrapped, tokenizer, state["log"], adapter_dir, state["step"], seconds, memory.peak,
                          memory.start)


# ---- checkpoints and outputs -----------------------------------------------------------------------

def _save_checkpoint(output_dir: pathlib.Path, model, optimizer, scheduler, state, accelerator, config,
                     sharded: bool = False) -> None:
    """checkpoint-<step>/: trainable parameters, optimizer, scheduler, trainer state (rank 0) and
    every process's RNG; written in a temporary folder and renamed, so a crash leaves the previous
    checkpoint complete. Keeps the newest ``save_total_limit``. Under FSDP the trainable parameters
    are gathered whole and every process writes its own optimizer shard."""
    step = state["step"]
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if sharded:  # collectives: every process takes part
        whole = {}
        for name, p in _trainable(model).items():
            value = _full(p).detach()
            if accelerator.is_main_process:  # only rank 0 writes: the others drop theirs at once
                whole[name] = value.cpu()
        torch.save(_local_optimizer_state(optimizer), tmp / f"optimizer_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(whole if sharded else {n: p.detach().cpu() for n, p in _trainable(model).items()},
                   tmp / "trainable.pt")
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if getattr(accelerator, "scaler", None) is not None:  # fp16's loss scale resumes too
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "tokens": state["tokens"], "log": state["log"],
                                                            "processes": accelerator.num_processes,
                                                            "config": dataclasses.asdict(config)}, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        for old in _checkpoints(output_dir)[:-config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: pathlib.Path) -> None:
    """Flush a checkpoint's files and folder before it is renamed into place (a power loss after the
    rename must not find it truncated)."""
    for f in path.iterdir():
        with open(f, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


#: Settings that must match for a resumed run to continue the same run.
SAME_RUN_FIELDS = ("model", "revision", "subfolder", "method", "data", "template", "cutoff_len", "train_on_inputs", "batch_size",
                   "micro_batch_size", "max_steps", "seed", "group_by_length", "optimizer", "schedule", "lr",
                   "warmup_steps", "lora_r", "adapter", "bottleneck_size", "num_virtual_tokens", "quant_bits",
                   "quant_method", "quant_group_size", "fsdp")


def check_same_run(checkpoint: pathlib.Path, config: FinetuneConfig) -> None:
    """Refuse to resume a checkpoint written with other settings (data order, schedule or shapes
    would differ from the run it claims to continue)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {})
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # as the file holds it (lists, not tuples)
    differ = [f"{k}: {saved[k]!r} then, {current[k]!r} now" for k in SAME_RUN_FIELDS
              if k in saved and saved[k] != current[k]]
    if differ:
        raise ValueError(f"resume: {checkpoint} was written by a run with other settings ({'; '.join(differ)}); "
                         "resume with the same settings, or start a new run in another output_dir")


def _load_checkpoint(path: pathlib.Path, model, optimizer, scheduler, state, rank: int, accelerator,
                     sharded: bool = False) -> None:
    trainer = json.loads((path / "trainer_state.json").read_text())
    written_sharded = bool(trainer.get("config", {}).get("fsdp")) and trainer.get("processes", 1) > 1
    if (sharded or written_sharded) and trainer.get("processes") != accelerator.num_processes:
        raise ValueError(f"{path} was written by an FSDP run of {trainer.get('processes')} processes; its optimizer "
                         f"state is split that way: resume with {trainer.get('processes')} processes, not "
                         f"{accelerator.num_processes}")
    saved = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    params = _trainable(model)
    if set(saved) != set(params):
        raise ValueError(f"{path} holds trainable parameters {sorted(set(saved) ^ set(params))[:4]} that this run's "
                         "model does not (or lacks ones it has): resume with the same method and settings")
    with torch.no_grad():
        for name, value in saved.items():
            _copy_whole_into(params[name], value)
    if sharded:
        _load_local_optimizer_state(optimizer, torch.load(path / f"optimizer_{rank}.pt", map_location="cpu",
                                                          weights_only=False))
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    if (path / "scaler.pt").is_file() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=False))
    state.update(step=trainer["step"], tokens=trainer["tokens"], log=trainer["log"])
    rng = path / f"rng_{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))


def _save_outputs(output_dir: pathlib.Path, model, tokenizer, log, config, whole_state=None,
                  sharded: bool = False) -> pathlib.Path:
    """The adapter in its method's format (output_dir/adapter; the whole model for full
    fine-tuning, from ``whole_state`` when given: an FSDP run's gathered state dict), the JSON log,
    and a loss curve (when matplotlib is installed). The merged model comes from a copy of the
    trained one, or after an FSDP run (whose model cannot be copied) from the base loaded again
    with the saved adapter."""
    out = output_dir / ("model" if config.method == "full" else "adapter")
    if whole_state is not None:
        model.save_pretrained(out, state_dict=whole_state)
    else:
        model.save_pretrained(out)
    if config.method == "full":
        tokenizer.save_pretrained(out)
    if config.merge and config.method in ("lora", "qlora"):
        merged_dir = output_dir / "merged"
        import copy

        if sharded:
            from ..models import load_model
            from ..tuning import from_pretrained

            base, _ = load_model(config.model, device=torch.device("cpu"), dtype=torch.float32,
                                 revision=config.revision, subfolder=config.subfolder)
            merged = from_pretrained(base, out).merge_and_unload(requantize=config.method == "qlora")
        else:
            merged = copy.deepcopy(model).merge_and_unload(requantize=config.method == "qlora")
        if config.method == "qlora":
            from ..quantization import save_quantized

            save_quantized(merged, merged_dir, tokenizer=tokenizer)
        else:
            merged.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
    tmp = output_dir / ".log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, output_dir / "log.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([e["step"] for e in log], [e["loss"] for e in log], marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over target tokens)")
        ax.set_title(f"{config.method} fine-tuning")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / "loss.png", dpi=100)
        plt.close(fig)
    except ImportError:
        logger.info('matplotlib is not installed: no loss curve (pip install "lightllm[demo]")')
    return out
