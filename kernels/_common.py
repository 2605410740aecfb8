"""Pieces the Triton kernels share: device facts, the split reduction, the rank-r epilogue.

Split reduction. A GEMV (a few rows of x) or a skinny GEMM (an output of r columns) has too few
output tiles to fill a GPU, so the reduction dimension is cut into SPLIT slices, one program each.
Instead of float32 atomics into a zeroed buffer (a memset launch, a cast launch and a result that
depends on the order the programs ran in), every program stores its partial tile in a workspace
and counts itself in on a per-tile counter; the program that arrives last sums the SPLIT partials
in slice order, applies the epilogue, stores the output and resets the counter to zero for the
next launch. One launch, and the same bits whatever the scheduling.

The counters live in one int32 buffer per (device, stream), zeroed once and left zeroed by every
launch that uses it. Launches on one stream run one after another, so they can share it; launches
that may run at the same time must be on different streams. Under CUDA graph capture a launch gets
a zeroed buffer of its own instead, from the graph's memory pool (see :func:`split_counters`), and
a launch that raises drops its stream's buffer (see :func:`split_launch`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def split_plan(tiles: int, length: int, block: int, device: torch.device, waves: int = 2) -> tuple[int, int]:
    """(splits, length per split) so that ``tiles * splits`` programs fill about ``waves`` waves of
    the GPU, each split a multiple of ``block`` long and at least one block."""
    blocks = max(1, triton.cdiv(length, block))
    wanted = max(1, triton.cdiv(waves * sm_count(device), max(tiles, 1)))
    splits = min(wanted, blocks)
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(max(length, 1), per_split), per_split


# Shared memory a block may opt in to, in bytes, by compute capability: for a torch whose device
# properties lack ``shared_memory_per_block_optin`` (CUDA C Programming Guide, compute capabilities).
SHARED_MEMORY_BY_CAPABILITY = {
    (7, 0): 98304, (7, 2): 98304, (7, 5): 65536,
    (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
    (9, 0): 232448, (10, 0): 232448, (10, 3): 232448, (12, 0): 101376, (12, 1): 101376,
}
UNKNOWN_CAPABILITY_SHARED_MEMORY = 101376  # the smallest of the Ampere and later generations
# The interpreter runs on the CPU with no shared memory to run out of (and its own small configs).
INTERPRETER_SHARED_MEMORY = 1 << 40

_SHARED_MEMORY: dict[int, int] = {}


def shared_memory_limit(device: torch.device) -> int:
    """Shared memory in bytes one program of a kernel may use on ``device`` (the opt-in maximum per
    block); unbounded (INTERPRETER_SHARED_MEMORY) for the CPU interpreter."""
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_MEMORY:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", None)
        if not limit:
            limit = SHARED_MEMORY_BY_CAPABILITY.get((props.major, props.minor), UNKNOWN_CAPABILITY_SHARED_MEMORY)
        _SHARED_MEMORY[index] = limit
    return _SHARED_MEMORY[index]


def first_fitting(candidates, shared_bytes, limit: int):
    """The first of ``candidates`` (in order of preference) whose estimated shared memory
    ``shared_bytes(candidate)`` is within ``limit``; the last one if none is (the smallest, which
    Triton then compiles or refuses with OutOfResources)."""
    for candidate in candidates:
        if shared_bytes(candidate) <= limit:
            return candidate
    return candidates[-1]


def fitting_configs(configs: list, shared_bytes, limit: int, k_name: str = "BLOCK_K") -> list:
    """An autotuner's ``configs`` for a device with ``limit`` bytes of shared memory: each config
    that fits (``shared_bytes(config)``, an estimate), or else its first variant that does with
    2 stages, then with ``k_name`` halved (down to 16); order kept, duplicates and configs without a
    fitting variant dropped (at least one config is kept: the smallest variant of the last one)."""
    fitted, seen, variant = [], set(), None
    for config in configs:
        stages = min(config.num_stages, 2)
        variants = [config] + [triton.Config({**config.kwargs, k_name: config.kwargs[k_name] >> halved},
                                             num_warps=config.num_warps, num_stages=stages)
                               for halved in range(config.kwargs[k_name].bit_length())
                               if config.kwargs[k_name] >> halved >= 16]
        for variant in variants:
            if shared_bytes(variant) <= limit:
                key = (tuple(sorted(variant.kwargs.items())), variant.num_warps, variant.num_stages)
                if key not in seen:
                    seen.add(key)
                    fitted.append(variant)
                break
    return fitted or [variant]


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counter_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (device.index if device.index is not None else torch.cuda.current_device(),
                torch.cuda.current_stream(device).cuda_stream)
    return (device.type,)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` (the current device: see split_launch) is capturing
    a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``count`` counters for one launch on the current stream;
    call it inside :func:`split_launch`.

    Outside graph capture: the stream's cached buffer, grown when too small (a new zeroed buffer;
    the old one is freed to the caching allocator, which reuses it only after the stream's pending
    launches). While the current stream is capturing a CUDA graph: a new buffer from the graph's
    memory pool, never cached. Its zeroing is captured with the launch, so each graph owns its
    counters and every replay starts from zero, whatever the cache does later and whichever graphs
    replay at the same time on other streams (graphs captured one after another on the same capture
    stream would otherwise share the cached buffer).
    """
    if _capturing(device):
        return torch.zeros(max(count, 1), dtype=torch.int32, device=device)
    key = _counter_key(device)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer


@contextlib.contextmanager
def split_launch(device: torch.device):
    """:func:`device_guard` for a launch that counts on :func:`split_counters`. If the launch raises,
    some programs may already have counted in (the interpreter runs them one by one, and an error
    in one leaves the earlier ones' counts), so the stream's cached buffer is dropped: the next
    launch starts from a fresh zeroed one instead of counters left part-way."""
    with device_guard(device):
        try:
            yield
        except BaseException:
            _COUNTERS.pop(_counter_key(device), None)
            raise


@triton.jit
def arrive(counter_ptr):
    """Count this program's partial in; returns how many had arrived before it (the last program
    of a tile sees SPLIT - 1). The barrier orders every thread's partial stores before the count,
    and the count is acquire-release, so the last program then sees every partial."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def sum_partials(ptrs, split_stride, mask, splits):
    """Sum of ``splits`` partial tiles at ``ptrs + i * split_stride``, in slice order, read from L2
    (other programs wrote them; ``.cg`` keeps a stale L1 line out)."""
    total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for i in range(1, splits):
        total += tl.load(ptrs + i * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def store_s_part(x_ptrs, stride_xk, a_ptr, stride_ar, stride_ak, k_first, k_end, k_step, ws_ptr, offs_m, m_ok, R,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """This program's part of S = x A^T, summed over the K blocks starting at k_first, k_step
    apart, below k_end, stored as rows ``offs_m`` of the [M, R] float32 tile at ``ws_ptr``; r in
    chunks of BLOCK_R (x is re-read from L1/L2 per chunk)."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        s_part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_first, k_end, k_step):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = tl.load(x_ptrs + offs_k[None, :].to(tl.int64) * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            at = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            s_part = tl.dot(x, at, s_part, input_precision=PRECISION)
        tl.store(ws_ptr + offs_m[:, None] * R + offs_r[None, :], s_part, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def add_rank_r(acc, s_ptr, stride_sm, stride_sr, s_split_stride, s_splits, b_ptr, stride_bn, stride_br,
               offs_m, offs_n, m_ok, n_ok, R, scale, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + scale * S[offs_m, :] @ B[offs_n, :]^T`` in float32, r in chunks of BLOCK_R.

    S may be given as ``s_splits`` partials (``s_split_stride`` apart) that are summed first. The
    scale multiplies the small S tile, not the output tile. The loop is not pipelined: it runs
    once or twice (r <= 64 is one chunk), and buffering its tiles in shared memory would cost more
    than the GEMM's own pipeline.
    """
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        s_mask = m_ok[:, None] & r_ok[None, :]
        s = sum_partials(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr,
                         s_split_stride, s_mask, s_splits)
        bt = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(s * scale, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` of a tiled GEMM, tiles ordered GROUP_M rows at a time along
    M so that consecutive programs share the same column tiles of the weight in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


def launch_tiled(kernel, tuned, m: int, n: int, args: tuple, flags: dict, interpreter_config: dict,
                 device: torch.device) -> None:
    """Launch a tiled GEMM over an [m, n] output: the autotuned version on a GPU; under the
    interpreter, where there is nothing to time, ``kernel`` with one small config."""
    with device_guard(device):
        if interpreted():
            blocks = interpreter_config
            grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
            kernel[grid](*args, **flags, **blocks)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            tuned[grid](*args, **flags)


@triton.jit
def lora_term(s_ptr, b_ptr, offs_m, offs_n, m_ok, n_ok, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """S[offs_m] B[offs_n]^T in float32 ([BLOCK_M, BLOCK_N]) for S [M, R] and B [N, R] (LoRA's rank-R
    term in a quantized GEMM's epilogue): R outer products, a few flops per output next to the
    weight bytes each output reads."""
    term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, R):
        s = tl.load(s_ptr + offs_m * R + j, mask=m_ok, other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64) * R + j, mask=n_ok, other=0.0)
        term += s[:, None] * b[None, :]
    return term
