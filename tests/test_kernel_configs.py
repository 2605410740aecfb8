"""Shared memory of the Triton kernels' configs: every config a wrapper can pick for sm_80, sm_86,
sm_89 and sm_90 is compiled ahead of time (no GPU needed) and fits that card's opt-in shared
memory per block; the wrappers' estimates are upper bounds of what the compiler allocates; and the
selection obeys the limit (without compiling).

The configs come from the wrappers' own selection functions, asked once per architecture with its
limit. The sweep covers the inputs a choice depends on (bits, element sizes, LoRA mode, BLOCK_R,
M bucket, rank, width); what does not change the choice is fixed at its largest use (bias, the
split reduction, float32 adapters, 16-byte aligned arguments, contiguous rows). sm_80, sm_86 and
sm_89 compile alike, so a config is compiled once for sm_80 and once for sm_90, and each result is
compared with the limit of every architecture that picked it.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import pytest
import torch

triton = pytest.importorskip("triton")

from lightllm.kernels import _common, adapter, blockwise, gptq, gptq_solver, lora, optim  # noqa: E402

# shared_memory_per_block_optin of each architecture, in bytes.
LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# The target each architecture is compiled for (sm_86/sm_89 allocate as sm_80 does).
TARGET = {80: 80, 86: 80, 89: 80, 90: 90}

HALF, FLOAT = "*fp16", "*fp32"
DTYPE_BYTES = {"*fp16": 2, "*bf16": 2, "*fp32": 4}


@dataclass(frozen=True)
class Case:
    """One launch as the wrapper would make it: the kernel, its pointer types, constexprs, the
    integer arguments a contiguous launch passes as 1, its float scalars, warps and stages."""
    module: str
    kernel: str
    pointers: tuple
    constexprs: tuple
    ones: tuple = ()
    floats: tuple = ()
    num_warps: int = 4
    num_stages: int = 3
    options: tuple = ()
    estimate: int | None = field(default=None, compare=False)  # the wrapper's estimate, bytes

    def describe(self) -> str:
        constexprs = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        pointers = ", ".join(f"{k}:{v}" for k, v in self.pointers)
        return (f"{self.kernel}({constexprs}; {pointers}; num_warps={self.num_warps}, "
                f"num_stages={self.num_stages})")


def case(kernel, pointers: dict, constexprs: dict, ones=(), floats=(), num_warps=4, num_stages=3, options=None,
         estimate=None) -> Case:
    fn = kernel.fn  # the Python function of the JIT (or, under the interpreter, interpreted) kernel
    return Case(fn.__module__, fn.__name__, tuple(sorted(pointers.items())), tuple(sorted(constexprs.items())),
                tuple(ones), tuple(floats), num_warps, num_stages, tuple(sorted((options or {}).items())), estimate)


# ---- what each wrapper picks on an architecture ------------------------------------------------

def gptq_cases(limit: int) -> list[Case]:
    out = []
    for bits in (2, 3, 4, 8):
        chunk = 32 // math.gcd(32, bits)  # values per run of packed words
        sweep = [(x, x, 0, 0, FLOAT, m) for x in (HALF, FLOAT) for m in (1, 64, 128)]  # (x, scales, LoRA, r, A, M)
        if bits == 4:
            sweep += [("*bf16", HALF, 0, 0, FLOAT, 1)]
        if bits == 3:  # the widest main loop; the adapter's phases do not depend on the bit width
            sweep += [(HALF, HALF, 1, 64, FLOAT, m) for m in (1, 64, 128)] + [(FLOAT, FLOAT, 1, 64, FLOAT, 1)]
            sweep += [(FLOAT, FLOAT, 2, 64, FLOAT, 1)]
        if bits in (3, 4):
            sweep += [(HALF, HALF, 2, r, FLOAT, 1) for r in (16, 64)]
        for x, scales, lora_mode, rank, adapter_ptr, m in sweep:
            block_r = lora._block_r(rank)
            sizes = (bits, DTYPE_BYTES[x], DTYPE_BYTES[scales], lora_mode, block_r, DTYPE_BYTES[adapter_ptr])
            blocks = gptq._blocks(m, *sizes, limit)
            bm, bn, bk, warps, stages = blocks
            _, epi, s_precision = lora._precisions(_torch_dtype(x))
            out.append(case(
                gptq._gptq_matmul_kernel,
                dict(x_ptr=x, qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr=scales, g_idx_ptr="*i32",
                     bias_ptr=x, lora_a_ptr=adapter_ptr, lora_s_ptr=FLOAT, lora_b_ptr=adapter_ptr, out_ptr=x,
                     ws_y_ptr=FLOAT, ws_s_ptr=FLOAT, counter_ptr="*i32"),
                dict(BITS=bits, CHUNK_VALUES=chunk, CHUNK_WORDS=chunk * bits // 32, ZERO_OFFSET=0,
                     HAS_BIAS=True, FP32_DOT=x == FLOAT, LORA=lora_mode, EPI_PRECISION=epi,
                     S_PRECISION=s_precision, BLOCK_R=block_r, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=2),
                ones=("stride_ak", "stride_br"), floats=("lora_scale",), num_warps=warps, num_stages=stages,
                estimate=gptq._shared_bytes(blocks, *sizes)))
        if bits in (3, 4):  # the dequantize kernel's one config
            out.append(case(gptq._gptq_dequantize_kernel,
                            dict(qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr=HALF, g_idx_ptr="*i32",
                                 out_ptr=FLOAT),
                            dict(BITS=bits, CHUNK_VALUES=chunk, CHUNK_WORDS=chunk * bits // 32, ZERO_OFFSET=0,
                                 BLOCK_N=64, BLOCK_K=64)))
    return out


def _torch_dtype(pointer: str) -> torch.dtype:
    return {HALF: torch.float16, "*bf16": torch.bfloat16, FLOAT: torch.float32}[pointer]


def lora_cases(limit: int) -> list[Case]:
    out = []
    for x, y in ((HALF, FLOAT), (HALF, HALF), (FLOAT, FLOAT)):  # S = x A^T, G = dY B, dA and dB
        for m in (64, 4096):
            for r in (8, 64) if y == FLOAT else (64,):
                blocks = lora._skinny_blocks(m, r, DTYPE_BYTES[x], DTYPE_BYTES[y], limit)
                bm, br, bk, warps, stages = blocks
                out.append(case(lora._skinny_kernel, dict(x_ptr=x, y_ptr=y, out_ptr=FLOAT, ws_ptr=FLOAT,
                                                           counter_ptr="*i32"),
                                dict(PRECISION=lora._precisions(_torch_dtype(x))[2], BLOCK_M=bm, BLOCK_R=br,
                                     BLOCK_K=bk),
                                ones=("stride_xk", "stride_yk", "stride_or"), floats=("scale",), num_warps=warps,
                                num_stages=stages,
                                estimate=lora._skinny_shared_bytes(blocks, DTYPE_BYTES[x], DTYPE_BYTES[y])))
    for x, ranks in ((HALF, (0, 64)), ("*bf16", (16,)), (FLOAT, (64,))):
        _, epi, s_precision = lora._precisions(_torch_dtype(x))
        for rank in ranks:
            block_r = lora._block_r(rank)
            for config in lora._fitting_matmul_configs(DTYPE_BYTES[x], block_r if rank else 0, limit):
                out.append(case(lora._lora_matmul_kernel,
                                dict(x_ptr=x, w_ptr=x, bias_ptr=x, s_ptr=FLOAT, b_ptr=FLOAT, y_ptr=x),
                                dict(HAS_BIAS=True, HAS_LORA=rank > 0, FP32_DOT=x == FLOAT, EPI_PRECISION=epi,
                                     BLOCK_R=block_r, **config.kwargs),
                                ones=("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_yn"),
                                floats=("scale",), num_warps=config.num_warps, num_stages=config.num_stages,
                                estimate=lora._matmul_shared_bytes(config, DTYPE_BYTES[x], block_r if rank else 0)))
            if x != "*bf16":
                a = FLOAT  # float32 adapters: the largest A tiles
                blocks = lora._fitting_decode_blocks(DTYPE_BYTES[x], block_r if rank else 0, DTYPE_BYTES[a], limit)
                bn, bk, warps, stages = blocks
                out.append(case(lora._lora_decode_kernel,
                                dict(x_ptr=x, w_ptr=x, bias_ptr=x, a_ptr=a, b_ptr=a, y_ptr=x, s_out_ptr=FLOAT,
                                     ws_y_ptr=FLOAT, ws_s_ptr=FLOAT, counter_ptr="*i32"),
                                dict(HAS_BIAS=True, HAS_LORA=rank > 0, FP32_DOT=x == FLOAT, EPI_PRECISION=epi,
                                     S_PRECISION=s_precision, BLOCK_R=block_r, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk),
                                ones=("stride_xk", "stride_wk", "stride_ak", "stride_br"), floats=("scale",),
                                num_warps=warps, num_stages=stages,
                                estimate=lora._decode_shared_bytes(blocks, DTYPE_BYTES[x], block_r if rank else 0,
                                                                   DTYPE_BYTES[a])))
    return out


def adapter_cases(limit: int) -> list[Case]:
    out = []
    for z, widths in ((HALF, (64, 4096)), (FLOAT, (4096,))):
        for n in widths:  # the decode kernel's config depends on the width only
            block_n, block_b, block_k, warps = adapter._decode_blocks(n)
            out.append(case(adapter._adapter_decode_kernel,
                            dict(z_ptr=z, res_ptr=z, wd_ptr=FLOAT, bd_ptr=FLOAT, wu_ptr=FLOAT, bu_ptr=FLOAT,
                                 scale_ptr=FLOAT, y_ptr=z, a_ptr=FLOAT, ws_ptr=FLOAT, counter_ptr="*i32"),
                            dict(ACT=4, HAS_BD=True, HAS_BU=True, PRECISION=lora._precisions(_torch_dtype(z))[2],
                                 BLOCK_M=16, BLOCK_N=block_n, BLOCK_B=adapter._block_b(1024, block_b),
                                 BLOCK_K=block_k),
                            ones=("stride_zk", "stride_rn", "stride_dk", "stride_uj"), num_warps=warps))
    for w, y in ((HALF, HALF), (FLOAT, FLOAT)):
        precision = "ieee" if y == FLOAT else lora._precisions(_torch_dtype(y))[1]
        for config in adapter._fitting_up_configs(DTYPE_BYTES[w], limit):
            out.append(case(adapter._adapter_up_kernel,
                            dict(a_ptr=FLOAT, w_ptr=w, bias_ptr=w, res_ptr=y, scale_ptr=FLOAT, y_ptr=y),
                            dict(ACT=4, HAS_BIAS=True, HAS_RES=True, HAS_SCALE=True, PRECISION=precision,
                                 **config.kwargs),
                            ones=("stride_aj", "stride_wj", "stride_rn", "stride_yn"), num_warps=config.num_warps,
                            num_stages=config.num_stages, estimate=adapter._up_shared_bytes(config, DTYPE_BYTES[w])))
    out.append(case(adapter._act_backward_kernel, dict(g_ptr=FLOAT, a_ptr=FLOAT, scale_ptr=FLOAT, da_ptr=FLOAT,
                                                       h_ptr=FLOAT), dict(ACT=4, BLOCK=1024)))
    return out


def other_cases() -> list[Case]:
    """Kernels with one config each (no GEMM; their shared memory is reduction scratch)."""
    out = []
    for blocksize in (64, 4096):
        per_program = max(1, blockwise._TILE // blocksize)
        out.append(case(blockwise._quantize_blockwise_kernel,
                        dict(x_ptr=FLOAT, midpoints_ptr=FLOAT, bucket_start_ptr="*u8", codes_ptr="*u8",
                             absmax_ptr=FLOAT),
                        dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, STEPS=4, USE_TABLE=True),
                        num_warps=8))
        out.append(case(blockwise._dequantize_blockwise_kernel,
                        dict(codes_ptr="*u8", absmax_ptr=FLOAT, map_ptr=FLOAT, out_ptr=FLOAT),
                        dict(BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program), num_warps=8))
    for algo in (0, 2):  # Adam and Lion: two and one state tensors
        out.append(case(optim._optimizer_step_kernel,
                        {**{name: "*i32" for name in ("work_tensor_ptr", "work_block_ptr", "skip_ptr", "bucket1_ptr",
                                                      "bucket2_ptr")},
                         **{name: FLOAT for name in ("qmap1_ptr", "mid1_ptr", "qmap2_ptr", "mid2_ptr", "lr_ptr",
                                                     "grad_scale_ptr", "found_inf_ptr")},
                         "table_ptr": "*i64", "weight_decay64_ptr": "*fp64"},
                        dict(ALGO=algo, PARAM_DTYPE="@float32", GRAD_DTYPE="@float32", STATE8=True, HAS_GRAD_SCALE=True,
                             HAS_FOUND_INF=True, MAXIMIZE=False, NESTEROV=True, STEPS1=4, TABLE1=True, STEPS2=4,
                             TABLE2=True, BLOCK=256),
                        floats=("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2",
                                "eps", "weight_decay"), num_warps=2, options=optim.LAUNCH_OPTIONS))
    out.append(case(gptq_solver._gptq_block_kernel,
                    dict(w_ptr=FLOAT, hinv_ptr=FLOAT, scale_ptr=FLOAT, zero_ptr=FLOAT, codes_ptr=FLOAT, err_ptr=FLOAT,
                         loss_ptr=FLOAT),
                    dict(MAXQ=15.0, BLOCK_N=16, BLOCK_K=128)))
    return out


def picked(arch: int) -> list[Case]:
    limit = LIMITS[arch]
    return gptq_cases(limit) + lora_cases(limit) + adapter_cases(limit) + other_cases()


# ---- compiling ahead of time, in child processes without the interpreter -------------------------

COMPILE_SCRIPT = """
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ALIGNED = [["tt.divisibility", 16]]  # what a launch with 16-byte aligned pointers and sizes passes

for line in sys.stdin:
    job = json.loads(line)
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    constexprs = {k: getattr(tl, v[1:]) if isinstance(v, str) and v.startswith("@") else v
                  for k, v in job["constexprs"]}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in job["ones"]:  # Triton specializes an integer argument equal to 1
            signature[name], constexprs[name] = "constexpr", 1
        elif name in dict(job["pointers"]):
            signature[name], attrs[(i,)] = dict(job["pointers"])[name], ALIGNED
        elif name in job["floats"]:
            signature[name] = "fp32"
        else:
            signature[name], attrs[(i,)] = "i32", ALIGNED
    options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"], **dict(job["options"])}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", job["target"], 32), options=options)
    print(json.dumps(compiled.metadata.shared), flush=True)
"""


def compile_shared(jobs: list[tuple[Case, int]], workers: int = 2) -> list[int]:
    """Shared memory in bytes of each (case, target) compiled ahead of time, in ``workers`` child
    processes without TRITON_INTERPRET (the parent may run under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    lines = [json.dumps({"module": c.module, "kernel": c.kernel, "pointers": c.pointers, "constexprs": c.constexprs,
                         "ones": c.ones, "floats": c.floats, "num_warps": c.num_warps, "num_stages": c.num_stages,
                         "options": c.options, "target": target}) for c, target in jobs]
    children = []
    for i in range(workers):
        jobs_file = tempfile.TemporaryFile("w+")
        jobs_file.write("\n".join(lines[i::workers]) + "\n")
        jobs_file.seek(0)
        children.append(subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT], stdin=jobs_file,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    shared = [0] * len(lines)
    for i, child in enumerate(children):
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stderr[-3000:]
        shared[i::workers] = [json.loads(line) for line in stdout.split()]
    return shared


def test_every_picked_config_fits_the_shared_memory_of_sm80_sm86_sm89_sm90():
    pytest.importorskip("triton.backends.nvidia")
    wanted: dict[tuple[Case, int], list[int]] = {}  # (case, target) -> the architectures that picked it
    for arch in LIMITS:
        for c in picked(arch):
            wanted.setdefault((c, TARGET[arch]), []).append(arch)
    jobs = list(wanted)
    shared = compile_shared(jobs)
    too_big, underestimated = [], []
    for (c, target), used in zip(jobs, shared):
        for arch in wanted[(c, target)]:
            if used > LIMITS[arch]:
                too_big.append(f"sm_{arch}: {c.describe()} needs {used} bytes, the card has {LIMITS[arch]}")
        if c.estimate is not None and used > c.estimate:
            underestimated.append(f"sm_{target} target: {c.describe()} needs {used} bytes, estimated {c.estimate}")
    assert not too_big, f"{len(too_big)} configs do not fit:\n" + "\n".join(too_big)
    assert not underestimated, "estimates below the compiled size:\n" + "\n".join(underestimated)


# ---- the selection obeys the limit (no compiling) ----------------------------------------------

def test_gptq_small_m_config_is_chosen_from_the_limit():
    # The H100 keeps 16 x 64 x 128 in 3 stages at every width; sm_86 never gets it (100.5 KiB at
    # 4 bits), and sm_80 not at 3 bits (164.5 KiB); both fall back to shorter K tiles.
    for bits in (2, 3, 4, 8):
        assert gptq._blocks(1, bits, 2, 2, 0, 16, 4, LIMITS[90]) == (16, 64, 128, 4, 3)
        assert gptq._blocks(1, bits, 2, 2, 0, 16, 4, LIMITS[86])[2] < 128
    assert gptq._blocks(1, 4, 2, 2, 0, 16, 4, LIMITS[80]) == (16, 64, 128, 4, 3)
    assert gptq._blocks(1, 3, 2, 2, 0, 16, 4, LIMITS[80])[2] < 128
    for arch, limit in LIMITS.items():
        for bits in (2, 3, 4, 8):
            for lora_mode in (0, 1, 2):
                for m in (1, 16, 17, 64, 65, 255):
                    if lora_mode == 2 and m > 16:
                        continue
                    blocks = gptq._blocks(m, bits, 4, 4, lora_mode, 64, 4, limit)
                    assert gptq._shared_bytes(blocks, bits, 4, 4, lora_mode, 64, 4) <= limit, (arch, bits, m)


def test_autotuned_configs_are_pruned_to_the_device(monkeypatch):
    """The autotuners' early_config_prune hooks ask the device's limit and drop or shrink the
    configs that do not fit it, so none of them is ever compiled."""
    x = torch.empty(4, 4, dtype=torch.float32)
    for limit in (LIMITS[86], LIMITS[90]):
        monkeypatch.setattr(lora, "shared_memory_limit", lambda device, limit=limit: limit)
        monkeypatch.setattr(adapter, "shared_memory_limit", lambda device, limit=limit: limit)
        configs = lora._prune_matmul_configs(lora._matmul_configs(), {"x_ptr": x}, HAS_LORA=True, BLOCK_R=64)
        assert configs and all(lora._matmul_shared_bytes(c, 4, 64) <= limit for c in configs)
        up = adapter._prune_up_configs(adapter._up_configs(), {"w_ptr": x})
        assert up and all(adapter._up_shared_bytes(c, 4) <= limit for c in up)
    # fp16 on an H100: the list as it was (every config fits)
    assert lora._fitting_matmul_configs(2, 0, LIMITS[90]) == lora._matmul_configs()
    # sm_86: 128 x 256 x 64 in 3 stages does not fit; its 2-stage variant does
    shrunk = lora._fitting_matmul_configs(2, 0, LIMITS[86])
    assert [(c.kwargs["BLOCK_K"], c.num_stages) for c in shrunk[:1]] == [(64, 2)]


def test_shared_memory_limit_reads_the_device_property_or_the_capability(monkeypatch):
    class Props:
        major, minor = 8, 6

    monkeypatch.setattr(_common, "_SHARED_MEMORY", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    assert _common.shared_memory_limit(torch.device("cuda", 0)) == 101376  # by capability
    Props.shared_memory_per_block_optin = 232448
    assert _common.shared_memory_limit(torch.device("cuda", 1)) == 232448  # the property
    assert _common.shared_memory_limit(torch.device("cuda", 0)) == 101376  # cached per device
    assert _common.shared_memory_limit(torch.device("cpu")) == _common.INTERPRETER_SHARED_MEMORY
