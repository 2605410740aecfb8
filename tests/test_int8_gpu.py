"""The Triton LLM.int8 kernels (kernels/int8.py, backend "triton" of ``lightllm::int8_linear``), on
the CPU through the interpreter here and on a GPU as they are: the reference's codes and output
bits at threshold 0, outlier columns found on the device and within the reference's error against
its own float64 pipeline, both int8 products (the kernel's tl.dot and torch._int_mm), no host
synchronization in the forward (a dispatch mode that fails on every op that reads a value back),
errors as ValueErrors, and the kernels compiled for sm_90 (int8 tensor-core MMA, no FMA contraction)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightllm
from lightllm import backends
from lightllm.quantization.bnb import int8 as int8_format

triton_int8 = pytest.importorskip("lightllm.kernels.int8")

pytestmark = [
    pytest.mark.skipif(backends.why_unavailable("triton") is not None,
                       reason=f"triton cannot run here: {backends.why_unavailable('triton')}"),
    # the interpreter's numpy on purpose-made edge values (an output beyond float16, an inf input)
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16 and fp32 (the interpreter computes bf16 wrongly: numpy has none); bf16 too on a GPU
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(40, 96), (33, 200), (24, 72)]  # (N, K): none a multiple of the tiles
ROWS = [1, 3, 17]


def int8_weight(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).half()
    cb, scb, _ = int8_format.int8_vectorwise_quant(w)
    return cb.to(DEVICE), scb.to(DEVICE)


def activations(m, k, dtype, seed, outliers=False):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 1.5
    if outliers:  # systematic outlier features, a lone one in the last row, one just below 2.5
        x[::2, 5] = 20.0
        x[-1, k - 1] = -7.5
        x[0, 7] = 2.49
    return x.to(dtype).to(DEVICE)


def ops(backend, *args):
    with lightllm.use_backend(backend), backends.record_dispatches() as calls:
        out = torch.ops.lightllm.int8_linear(*args)
    assert [c.ran for c in calls if c.op == "int8_linear"] == [backend]
    return out


def exact_int8(x, cb, scb, bias, threshold):
    """The reference's pipeline in float64 from its own codes: exact product, scaled, plus the 16-bit
    outlier columns against the dequantized int8 weight (rounded to x's dtype, as it does)."""
    a, cb, scb = x.reshape(-1, x.shape[-1]).cpu(), cb.cpu(), scb.cpu()
    ca, sca, cols = int8_format.int8_vectorwise_quant(a.half(), threshold)
    y = (ca.double() @ cb.double().t()) * (sca.double()[:, None] * scb.double()[None, :]) / 127 ** 2
    if bias is not None:
        y = y + bias.cpu().to(x.dtype).double()
    if cols is not None and cols.numel():
        y = y + a[:, cols].double() @ int8_format.int8_vectorwise_dequant(cb[:, cols], scb).to(x.dtype).double().t()
    return y


def within_reference_error(got, ref, exact):
    """At most twice the reference's error against float64, or 4 roundings of the dtype."""
    assert got.dtype == ref.dtype and got.shape == ref.shape == exact.shape
    err = (got.cpu().double() - exact).abs().max().item()
    err_ref = (ref.cpu().double() - exact).abs().max().item()
    bound = max(2 * err_ref, 4 * torch.finfo(ref.dtype).eps * exact.abs().max().item())
    assert err <= bound, (err, err_ref, bound)


@pytest.fixture(params=["dot", "int_mm"])
def product(request, monkeypatch):
    """The int8 product of the kernel's own tl.dot, or torch._int_mm's (cuBLASLt on a GPU, which
    takes more than 16 rows; the CPU's _int_mm here) read by the same epilogue."""
    if request.param == "int_mm":
        monkeypatch.setattr(triton_int8, "use_int_mm", lambda m, n, k, device: device.type == "cpu" or (
            m > 16 and n % 8 == 0 and k % 8 == 0))  # cuBLASLt's conditions
    else:
        monkeypatch.setattr(triton_int8, "use_int_mm", lambda m, n, k, device: False)
    return request.param


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_is_the_references_bits(backend, dtype, product):
    for n, k in SHAPES:
        cb, scb = int8_weight(n, k, n + k)
        bias = torch.randn(n).to(DEVICE) if n % 2 == 0 else None
        for m in ROWS if product == "dot" else [1, 17]:
            x = activations(m, k, dtype, m + k)
            x[0, :3] = torch.tensor([0.0, 1e-4, -65000.0]).to(dtype)  # a huge value flattens row 0
            if m > 2:
                x[2] = 0  # an all-zero row: stats 0, codes 0
            got, ref = ops(backend, x, cb, scb, bias, 0.0), ops("torch", x, cb, scb, bias, 0.0)
            assert torch.equal(got, ref), (n, k, m, int((got != ref).sum()))


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_columns_within_the_references_error(backend, dtype, product):
    """threshold 2.5: outlier columns in every case, their 16-bit product added in float32; the
    reference's bits when a call finds none."""
    for n, k in SHAPES:
        cb, scb = int8_weight(n, k, n * k)
        bias = torch.randn(n).to(DEVICE) if n % 2 == 0 else None
        for m in ROWS if product == "dot" else [1, 17]:
            x = activations(m, k, dtype, k + m, outliers=True)
            _, _, cols = int8_format.int8_vectorwise_quant(x.cpu().half(), 2.5)
            assert 5 in cols.tolist() and k - 1 in cols.tolist()
            got, ref = ops(backend, x, cb, scb, bias, 2.5), ops("torch", x, cb, scb, bias, 2.5)
            within_reference_error(got, ref, exact_int8(x, cb, scb, bias, 2.5))
            calm = x.clamp(-2.4, 2.4)
            assert torch.equal(ops(backend, calm, cb, scb, bias, 2.5), ops("torch", calm, cb, scb, bias, 2.5))


@pytest.mark.parametrize("threshold", [0.0, 2.5, 3.3012])
def test_codes_and_stats_are_the_references(threshold):
    """The row quantization alone, ties included: a row whose max is 127 has scale (1/127)*127 = 1,
    so x.5 values are exact ties (to even); 3.3012 is compared as the float16 3.30078125."""
    x = activations(6, 72, torch.float32, 1).clamp(-2.4, 2.4)
    x[1, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]) / (100 if threshold else 1)
    x[3] = 0
    x[4, 10] = 3.30078125  # float16(3.3012)
    x[4, 11] = 3.298828125  # the float16 value below it
    if threshold:
        x[5, 20] = -1e5  # above the float16 range: inf, an outlier
    codes, stats, idx, count = triton_int8.quantize_rows(x, threshold)
    ref_codes, ref_stats, ref_cols = int8_format.int8_vectorwise_quant(x.cpu().half(), threshold)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(stats.cpu(), ref_stats)
    if threshold:
        assert idx[: int(count)].cpu().tolist() == ref_cols.tolist() == ([10, 11, 20] if threshold == 2.5 else [10, 20])
    else:
        assert idx is None and count is None
        assert ref_codes[1, 1:7].tolist() == [0, 2, 2, 0, -2, -2]


class _NoHostSync(TorchDispatchMode):
    """Records every aten op and refuses the ones that read a device value back to the host or
    whose output shape depends on values (a GPU would synchronize there)."""

    FORBIDDEN = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.argwhere", "aten.item",
                 "aten.unique", "aten._unique", "aten.equal", "aten.is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.seen.append(name)
        if name.startswith(self.FORBIDDEN):
            raise AssertionError(f"host synchronization: {name}")
        if name.startswith("aten.index.Tensor") and any(
                t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())):
            raise AssertionError(f"host synchronization: {name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0])
def test_forward_never_synchronizes_with_the_host(threshold, monkeypatch):
    """The Triton implementation at every threshold, both products: no op whose result the host
    must wait for. (The reference's argwhere is caught by the same mode: the check works.)"""
    with lightllm.use_backend("triton"):
        _, impl = backends.resolve("int8_linear", torch.device(DEVICE))
    cb, scb = int8_weight(24, 72, 0)
    x = activations(17, 72, torch.float16, 0, outliers=True)
    bias = torch.randn(24).to(DEVICE)
    for int_mm in (False, True):
        monkeypatch.setattr(triton_int8, "use_int_mm", lambda m, n, k, device, on=int_mm: on)
        with _NoHostSync() as mode:
            y = impl(x, cb, scb, bias, threshold)
        assert y.shape == (17, 24) and mode.seen
        assert ("aten._int_mm.default" in mode.seen) == int_mm
    with lightllm.use_backend("torch"):
        _, reference = backends.resolve("int8_linear", torch.device(DEVICE))
    with pytest.raises(AssertionError, match="host synchronization"), _NoHostSync():
        reference(x, cb, scb, bias, 2.5)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 80])
def test_cuda_graph_capture_with_changing_outlier_columns(m):
    """On a GPU: the forward at threshold 6 is captured in a CUDA graph (impossible with a host
    sync) and replayed on inputs whose outlier columns differ from the captured ones."""
    cb, scb = int8_weight(40, 96, 0)
    bias = torch.randn(40).to(DEVICE)

    def inputs(seed):
        x = activations(m, 96, torch.float16, seed)
        x[::2, 5 + 11 * seed] = 20.0
        return x

    x = inputs(0)
    with lightllm.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.ops.lightllm.int8_linear(x, cb, scb, bias, 6.0)  # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = torch.ops.lightllm.int8_linear(x, cb, scb, bias, 6.0)
        torch.cuda.current_stream().wait_stream(side)
        x.copy_(inputs(1))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.ops.lightllm.int8_linear(x, cb, scb, bias, 6.0)
    assert torch.equal(out, eager)
    within_reference_error(out, ops("torch", x, cb, scb, bias, 6.0), exact_int8(x, cb, scb, bias, 6.0))


@pytest.mark.parametrize("backend", ["triton"])
def test_the_layer_runs_the_triton_kernel(backend):
    """Linear8bitLt on a 3-D input: the reference's bits at threshold 0, its error bar at 6."""
    from lightllm.nn import Linear8bitLt

    torch.manual_seed(0)
    linear = torch.nn.Linear(72, 24).half()
    x = activations(6, 72, torch.float16, 2, outliers=True).view(2, 3, 72) * 4
    for threshold in (0.0, 6.0):
        layer = Linear8bitLt.from_linear(linear, threshold=threshold).to(DEVICE).eval()
        with lightllm.use_backend(backend), backends.record_dispatches() as calls:
            got = layer(x)
        with lightllm.use_backend("torch"):
            ref = layer(x)
        assert calls and all(c.ran == "triton" for c in calls if c.op == "int8_linear")
        assert got.shape == (2, 3, 24) and got.dtype == torch.float16
        if threshold == 0.0:
            assert torch.equal(got, ref)
        else:
            within_reference_error(got.view(6, 24), ref.view(6, 24),
                                   exact_int8(x.view(6, 72), layer.weight.data, layer.weight.SCB, layer.bias, 6.0))


@pytest.mark.no_dispatch
@pytest.mark.parametrize("backend", ["triton"])
def test_bad_input_is_a_value_error_naming_it(backend):
    op = torch.ops.lightllm.int8_linear
    cb, scb = int8_weight(8, 64, 0)
    x = torch.randn(2, 64).to(DEVICE)
    with lightllm.use_backend(backend):
        with pytest.raises(ValueError, match=r"x has 63 features, CB of shape \[8, 64\] takes 64"):
            op(torch.randn(2, 63).to(DEVICE), cb, scb, None, 0.0)
        with pytest.raises(ValueError, match="CB must be a 2-D int8 weight"):
            op(x, cb.float(), scb, None, 0.0)
        with pytest.raises(ValueError, match="CB must be a 2-D int8 weight"):
            op(x, cb.view(-1), scb, None, 0.0)
        with pytest.raises(ValueError, match=r"SCB must hold one float32 absmax per output row \(8\)"):
            op(x, cb, scb[:4], None, 0.0)
        with pytest.raises(ValueError, match=r"SCB must hold one float32 absmax per output row \(8\)"):
            op(x, cb, scb.half(), None, 0.0)
        with pytest.raises(ValueError, match="bias has 3 values, the layer has 8 outputs"):
            op(x, cb, scb, torch.randn(3).to(DEVICE), 0.0)
        with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Int"):
            op(torch.ones(2, 64, dtype=torch.int32).to(DEVICE), cb, scb, None, 0.0)


def test_empty_inputs():
    cb, scb = int8_weight(8, 64, 0)
    with lightllm.use_backend("triton"):
        y = torch.ops.lightllm.int8_linear(torch.randn(0, 64).to(DEVICE), cb, scb, None, 6.0)
    assert y.shape == (0, 8)


AOT_PTX_SCRIPT = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightllm.kernels import int8 as k

found = {}
def compile(name, fn, signature, constants, warps, stages=3):
    source = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constants}}, constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "num_stages": stages, **k.LAUNCH_OPTIONS}).asm["ptx"]
    found[name] = {"fma": ptx.count("fma.rn.f32"), "int8_mma": len(re.findall(r"(?:mma|wgmma)[\\w.]*s8", ptx)),
                   "rounded_mul": len(re.findall(r"\\bmul\\.rn\\.f32\\b", ptx))}

ptrs = ["a_ptr", "b_ptr", "c_ptr", "row_ptr", "col_ptr", "bias_ptr", "x_ptr", "idx_ptr", "count_ptr", "out_ptr",
        "lora_s_ptr", "lora_b_ptr"]
for m, given, dtype, lora in ((1, False, "fp16", False), (32, False, "fp16", False), (1024, False, "fp16", False),
                              (1024, True, "fp16", False), (1024, False, "bf16", False), (1, False, "fp32", False),
                              (1, False, "fp16", True), (1024, True, "bf16", True)):
    types = ["*i8", "*i8", "*i32", "*fp32", "*fp32", "*" + dtype, "*" + dtype, "*i32", "*i32", "*" + dtype,
             "*fp32", "*fp32"]
    sig = dict(zip(ptrs, types), lora_scale="fp32", M="i32", N="i32", K="i32", stride_xm="i32", stride_cm="i32",
               R="i32")
    config = k._matmul_config(m)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    consts = dict(HAS_BIAS=True, OUTLIERS=True, PRODUCT_GIVEN=given, IEEE_OUTLIERS=dtype == "fp32", HAS_LORA=lora,
                  **config)
    # the LoRA epilogue's S B^T is a float32 product (FMAs by design): compiled, not counted
    name = (f"lora epilogue (fp32) m={m} {dtype}" if lora
            else f"matmul m={m} {'int_mm' if given else 'dot'} {dtype}")
    compile(name, k._int8_matmul_kernel, sig, consts, warps, stages)
sig = dict(x_ptr="*fp16", mask_ptr="*i32", codes_ptr="*i8", stats_ptr="*fp32", K="i32", stride_xm="i32",
           threshold="fp32")
compile("quantize", k._quantize_rows_kernel, sig, dict(THRESHOLD=True, BLOCK_K=1024), 4)
compile("columns", k._outlier_columns_kernel, dict(x_ptr="*fp16", mask_ptr="*i32", M="i32", K="i32", stride_xm="i32",
        rows_per_split="i32", threshold="fp32"), dict(BLOCK_M=32, BLOCK_K=128), 4)
compile("compact", k._compact_kernel, dict(mask_ptr="*i32", idx_ptr="*i32", count_ptr="*i32", K="i32"),
        dict(BLOCK=1024), 4)
print(json.dumps(found))
"""


def test_kernels_compile_for_sm90_with_int8_mma_and_no_fma():
    """Compiled ahead of time for sm_90 as launched (no GPU needed; a child process without the
    interpreter): the product is an int8 tensor-core MMA, and the epilogue's float32 scaling is
    explicitly rounded (``mul.rn``), never contracted into an FMA the reference does not do."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("no ptxas to compile with")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name, kernel in found.items():
        if name.startswith("matmul"):
            assert (kernel["int8_mma"] > 0) == (" dot " in name), (name, kernel)
        if "fp32" not in name:  # the float32 outlier product is an IEEE dot: FMAs by design
            assert kernel["fma"] == 0, (name, kernel)
        if name.startswith(("matmul", "quantize")):
            assert kernel["rounded_mul"] > 0, (name, kernel)


def test_strided_bias_and_x_give_the_reference_bits():
    """A bias that is a strided view (every second value of a buffer) and a non-contiguous x."""
    n, k, m = 40, 96, 3
    cb, scb = int8_weight(n, k, 11)
    bias = torch.randn(2 * n, generator=torch.Generator().manual_seed(12)).to(DEVICE)[::2]
    x = activations(k, m, torch.float32, 13).t()  # [m, k], strides (1, m)
    assert not bias.is_contiguous() and not x.is_contiguous()
    got = ops("triton", x, cb, scb, bias, 0.0)
    assert torch.equal(got, ops("torch", x, cb, scb, bias, 0.0))
