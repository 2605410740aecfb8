"""The GPU backends of the 4-bit NF4 / FP4 ops (kernels/fourbit.py in Triton, csrc/fourbit.cu in
CUDA), and the double-quantization arguments of ``matmul_4bit``.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (float32 and float16: the interpreter has
no bfloat16) on small awkward shapes: K a multiple of the blocksize, blocks straddling rows (K %
blocksize != 0), odd K (the dequantize path), 1 to 16 rows (the GEMV) and 17 (dequantize + matmul).
The GEMV is held to twice the reference's own error against float64 (or 4 roundings of the dtype);
the dequantization, and so the path above 16 rows, to the reference's bits. The CUDA kernels run
only in the ``gpu`` tests (skipped without a device)."""

import pytest
import torch

import lightllm
from lightllm import backends
from lightllm.ops import fourbit as ops_fourbit
from lightllm.quantization.bnb import nf4

from conftest import gpu_backends

triton_cpu = pytest.mark.skipif(not (backends.triton_interpreted() and backends.why_unavailable("triton") is None),
                                reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1")

mm = torch.ops.lightllm.matmul_4bit
dq = torch.ops.lightllm.dequantize_4bit

# (N, K, blocksize): K a multiple of the blocksize; 96 at 64 and 200 at 32 where blocks straddle rows;
# 256 at 32 with an odd N; K = 63, odd, where rows start mid-byte (the dequantize path)
SHAPES = [(40, 96, 64), (33, 256, 32), (24, 200, 32), (16, 128, 128), (9, 63, 32)]
ROWS = [1, 3, 16, 17]


def weight(n, k, blocksize, quant_type, nested, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed + n * k + blocksize)
    w = torch.randn(n, k, generator=gen)
    packed, state = nf4.quantize_4bit(w.to(device), blocksize=blocksize, compress_statistics=nested,
                                      quant_type=quant_type)
    return packed.reshape(-1), state


def op_args(state):
    """(absmax argument, trailing nested arguments) of matmul_4bit for a quant state."""
    return state.absmax, ops_fourbit.nested_args(state)


def exact(x, state, packed, bias):
    n, k = state.shape
    w64 = ops_fourbit.dequantize_4bit_reference(packed, state.float_absmax(), state.blocksize, state.quant_type, n * k,
                                                torch.float64).view(n, k)
    y = x.double() @ w64.t()
    return y if bias is None else y + bias.to(x.dtype).double()


def within_reference_error(got, ref, exact_y):
    assert got.dtype == ref.dtype and got.shape == ref.shape == exact_y.shape
    err = (got.double() - exact_y).abs().max().item()
    err_ref = (ref.double() - exact_y).abs().max().item()
    bound = max(2 * err_ref, 4 * torch.finfo(ref.dtype).eps * exact_y.abs().max().item())
    assert err <= bound, (err, err_ref, bound)


def run(backend, fn, *args):
    with lightllm.use_backend(backend):
        return fn(*args)


# ---- the op's double-quantization arguments (every backend) ----------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nested_arguments_give_the_float_absmax_bits(quant_type):
    """The reference and the C++ backend with the raw nested state: the same bits as with the decoded
    float32 absmax (QuantState.float_absmax), forward and backward; the fake impl's shape."""
    cpu = [b for b in ("torch", "cpp") if backends.why_unavailable(b) is None]
    for n, k, blocksize in [(40, 96, 64), (300, 256, 32)]:  # 2400 blocks: several nested blocks of 256
        packed, state = weight(n, k, blocksize, quant_type, True)
        absmax, nested = op_args(state)
        for backend in cpu:
            for m, dtype in [(1, torch.float32), (5, torch.bfloat16), (17, torch.float16)]:
                x = torch.randn(m, k).to(dtype).requires_grad_()
                bias = torch.randn(n, requires_grad=True)
                y = run(backend, mm, x, packed, absmax, blocksize, quant_type, n, bias, *nested)
                y_ref = run(backend, mm, x, packed, state.float_absmax(), blocksize, quant_type, n, bias)
                assert torch.equal(y, y_ref), (backend, n, k, m, dtype)
                g = torch.randn_like(y)
                gx, gb = torch.autograd.grad(y, (x, bias), g)
                gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, bias), g)
                assert torch.equal(gx, gx_ref) and torch.equal(gb, gb_ref)
    with torch.device("meta"):
        y = mm(torch.empty(2, 3, 96), torch.empty(40 * 48, dtype=torch.uint8), torch.empty(60, dtype=torch.uint8), 64,
               quant_type, 40, None, torch.empty(1), torch.empty(256), 256, torch.empty(()))
    assert y.shape == (2, 3, 40)


def test_linear4bit_passes_the_raw_nested_state():
    layer = lightllm.nn.LinearNF4(128, 24, compute_dtype=torch.float32)
    layer.load_state_dict(torch.nn.Linear(128, 24).state_dict())
    assert layer.quant_state.nested
    seen = []
    real = ops_fourbit.matmul_4bit_reference

    def spy(*args):
        seen.append(args)
        return real(*args)

    x = torch.randn(3, 128)
    with lightllm.use_backend("torch"):
        impl = backends._REGISTRY[ops_fourbit.MATMUL]["torch"]
        backends._REGISTRY[ops_fourbit.MATMUL]["torch"] = backends.Implementation(spy, impl.devices)
        try:
            y = layer(x)
        finally:
            backends._REGISTRY[ops_fourbit.MATMUL]["torch"] = impl
    assert seen and seen[0][2].dtype == torch.uint8
    assert seen[0][7].data_ptr() == layer.quant_state.state2.absmax.data_ptr()
    w = layer.dequantize(torch.float32)
    assert torch.equal(y, torch.nn.functional.linear(x, w, layer.bias))


def test_opcheck_with_nested_arguments():
    packed, state = weight(16, 64, 32, "nf4", True)
    absmax, nested = op_args(state)
    with lightllm.use_backend("torch"):
        torch.library.opcheck(mm, (torch.randn(2, 64), packed, absmax, 32, "nf4", 16, torch.randn(16), *nested),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- Triton on the CPU (interpreter) -------------------------------------------------------------

@triton_cpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["float-absmax", "nested"])
def test_triton_matmul_4bit(backend, quant_type, nested):
    from lightllm.kernels import fourbit as triton_fourbit

    gemv_calls = []
    gemv = triton_fourbit.matmul_4bit

    def counting(*args, **kwargs):
        gemv_calls.append(args[0].shape)
        return gemv(*args, **kwargs)

    triton_fourbit.matmul_4bit = counting
    try:
        for i, (n, k, blocksize) in enumerate(SHAPES):
            packed, state = weight(n, k, blocksize, quant_type, nested, seed=i)
            absmax, rest = op_args(state)
            for j, m in enumerate(ROWS):
                dtype = (torch.float32, torch.float16)[(i + j) % 2]
                bias = torch.randn(n) if (i + j) % 3 else None
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
                args = (x, packed, absmax, blocksize, quant_type, n, bias, *rest)
                got, ref = run(backend, mm, *args), run("torch", mm, *args)
                if m > 16 or k % 2:  # dequantize (the reference's bits) + torch's matmul
                    assert torch.equal(got, ref), (n, k, m)
                else:
                    within_reference_error(got, ref, exact(x, state, packed, bias))
    finally:
        triton_fourbit.matmul_4bit = gemv
    expected = sum(1 for n, k, _ in SHAPES if k % 2 == 0 for m in ROWS if m <= 16)
    assert len(gemv_calls) == expected  # the GEMV served every call it takes


@triton_cpu
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_gemv_split_k_and_leading_dims(backend):
    """The split reduction (forced: the interpreter's default is one slice) and x with leading dims."""
    from lightllm.kernels import fourbit as triton_fourbit

    packed, state = weight(48, 512, 64, "nf4", True)
    absmax, rest = op_args(state)
    nested = (rest[0], rest[1], rest[2], rest[3])
    for m in (1, 5):
        x = torch.randn(m, 512)
        one = triton_fourbit.matmul_4bit(x, packed, absmax, 64, "nf4", 48, None, nested, split_k=1)
        split = triton_fourbit.matmul_4bit(x, packed, absmax, 64, "nf4", 48, None, nested, split_k=3)
        within_reference_error(split, one, exact(x, state, packed, None))
    x = torch.randn(2, 3, 512)
    got = run(backend, mm, x, packed, absmax, 64, "nf4", 48, None, *rest)
    assert got.shape == (2, 3, 48)
    within_reference_error(got, run("torch", mm, x, packed, absmax, 64, "nf4", 48, None, *rest),
                           exact(x.reshape(6, 512), state, packed, None).view(2, 3, 48))


@triton_cpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_dequantize_4bit_is_the_references_bits(backend, quant_type):
    from lightllm.kernels import fourbit as triton_fourbit

    for n, blocksize in [(1, 64), (7, 32), (33 * 100, 64), (4096 + 37, 4096), (40 * 96, 128)]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
        x[:blocksize] = 0  # an all-zero block
        packed, absmax = run("torch", torch.ops.lightllm.quantize_4bit, x, blocksize, quant_type)
        for dtype in (torch.float32, torch.float16):
            got = run(backend, dq, packed, absmax, blocksize, quant_type, n, dtype)
            assert torch.equal(got, run("torch", dq, packed, absmax, blocksize, quant_type, n, dtype))
    # as the C++ kernel, dequantize_4bit takes more bytes and absmax than n values need (the first n)
    got = run(backend, dq, packed, absmax, 128, quant_type, n - 100, torch.float32)
    assert torch.equal(got, run("torch", dq, packed, absmax, 128, quant_type, n - 100, torch.float32))
    packed, state = weight(300, 256, 32, quant_type, True)  # 2400 absmax codes: 10 nested blocks
    got = triton_fourbit.dequantize_4bit(packed, state.absmax, 32, quant_type, 300 * 256, torch.float16,
                                         ops_fourbit.nested_args(state))
    assert torch.equal(got, run("torch", dq, packed, state.float_absmax(), 32, quant_type, 300 * 256, torch.float16))


@triton_cpu
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_linear4bit_forward_and_backward(backend):
    torch.manual_seed(0)
    layer = lightllm.nn.LinearFP4(200, 40, compute_dtype=torch.float16, blocksize=32)  # blocks straddle rows
    layer.load_state_dict(torch.nn.Linear(200, 40).state_dict())
    for m in (2, 20):
        x = torch.randn(m, 200, dtype=torch.float16, requires_grad=True)
        got = run(backend, layer, x)
        ref = run("torch", layer, x)
        within_reference_error(got, ref, exact(x.detach(), layer.quant_state, layer.weight.data.reshape(-1),
                                               layer.bias.detach()))
        g = torch.randn_like(got)
        with lightllm.use_backend(backend):
            (gx,) = torch.autograd.grad(got, x, g)
        (gx_ref,) = torch.autograd.grad(ref, x, g)
        assert torch.equal(gx, gx_ref)


@triton_cpu
@pytest.mark.no_dispatch
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_bad_input_is_a_value_error_naming_it(backend):
    x = torch.randn(4, 128)
    packed, absmax = run("torch", torch.ops.lightllm.quantize_4bit, torch.randn(8, 128), 64, "nf4")
    _, state = weight(8, 128, 64, "nf4", True)
    nested = ops_fourbit.nested_args(state)
    with lightllm.use_backend(backend):
        with pytest.raises(ValueError, match="packed must be uint8 bytes, got Float"):
            mm(x, packed.float(), absmax, 64, "nf4", 8, None)
        with pytest.raises(ValueError, match=r"packed holds 512 bytes; 1152 4-bit values need 576"):
            mm(x, packed, absmax, 64, "nf4", 9, None)
        with pytest.raises(ValueError, match=r"absmax holds 15 values; 1024 values at blocksize 64 need 16"):
            mm(x, packed, absmax[:15], 64, "nf4", 8, None)
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096, got 48"):
            mm(x, packed, absmax, 48, "nf4", 8, None)
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096, got 16"):
            dq(packed, absmax, 16, "nf4", 1024, torch.float32)
        with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
            mm(x, packed, absmax, 64, "int4", 8, None)
        with pytest.raises(ValueError, match="absmax must be float32, got Half"):
            mm(x, packed, absmax.half(), 64, "nf4", 8, None)
        with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Long"):
            mm(torch.ones(4, 128, dtype=torch.long), packed, absmax, 64, "nf4", 8, None)
        with pytest.raises(ValueError, match="bias has 7 values, the layer has 8 outputs"):
            mm(x, packed, absmax, 64, "nf4", 8, torch.randn(7))
        with pytest.raises(ValueError, match="double-quantized absmax must be uint8 codes, got Float"):
            mm(x, packed, absmax, 64, "nf4", 8, None, *nested)
        with pytest.raises(ValueError, match="nested_absmax must hold 1 float32 values"):
            mm(x, packed, state.absmax, 64, "nf4", 8, None, torch.ones(2), nested[1], 256, nested[3])
        with pytest.raises(ValueError, match=r"packed holds 511 bytes; 1024 4-bit values need 512"):
            dq(packed[:-1], absmax, 64, "nf4", 1024, torch.float32)


# ---- GPU ------------------------------------------------------------------------------------------

GPU_KERNELS = [b for b in gpu_backends() if b != "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matmul_4bit_gpu(backend, quant_type, dtype):
    shapes = SHAPES + [(4096, 4096, 64), (1056, 4160, 64), (777, 1000, 128), (11008, 4096, 64)]
    for i, (n, k, blocksize) in enumerate(shapes):
        for nested in (False, True):
            packed, state = weight(n, k, blocksize, quant_type, nested, device="cuda", seed=i)
            absmax, rest = op_args(state)
            bias = torch.randn(n, device="cuda") if i % 2 else None
            for m in (1, 2, 5, 8, 16, 17, 64):
                x = torch.randn(m, k, device="cuda").to(dtype)
                args = (x, packed, absmax, blocksize, quant_type, n, bias, *rest)
                got, ref = run(backend, mm, *args), run("torch", mm, *args)
                if m > 16:
                    assert torch.equal(got, ref), (n, k, m, nested)
                else:
                    within_reference_error(got, ref, exact(x, state, packed, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_dequantize_4bit_gpu_is_the_references_bits(backend):
    for quant_type in ("nf4", "fp4"):
        for n, blocksize in [(1, 64), (7, 32), (4096 * 11008, 64), (1_000_003, 4096), (40 * 96, 128)]:
            x = torch.randn(n, device="cuda") * 3
            packed, absmax = run("torch", torch.ops.lightllm.quantize_4bit, x, blocksize, quant_type)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                got = run(backend, dq, packed, absmax, blocksize, quant_type, n, dtype)
                assert torch.equal(got, run("torch", dq, packed, absmax, blocksize, quant_type, n, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_linear4bit_gpu_nested_decode_and_graph(backend):
    """A double-quantized layer at M = 1 (the absmax decoded in the kernel) and its CUDA graph replay."""
    layer = lightllm.nn.LinearNF4(4096, 1024, compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    with lightllm.use_backend(backend):
        got = layer(x)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        layer(static_x)  # warm-up (Triton compiles outside the capture)
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(x)
        graph.replay()
    ref = run("torch", layer, x)
    within_reference_error(got, ref, exact(x, layer.quant_state, layer.weight.data.reshape(-1), layer.bias.detach()))
    assert torch.equal(static_y, got)


@pytest.mark.gpu
@pytest.mark.no_dispatch
@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_bad_input_gpu_is_a_value_error(backend):
    x = torch.randn(4, 128, device="cuda")
    packed, absmax = run("torch", torch.ops.lightllm.quantize_4bit, torch.randn(8, 128, device="cuda"), 64, "nf4")
    with lightllm.use_backend(backend):
        with pytest.raises(ValueError, match="packed must be uint8 bytes"):
            mm(x, packed.float(), absmax, 64, "nf4", 8, None)
        with pytest.raises(ValueError, match=r"absmax holds 15 values"):
            mm(x, packed, absmax[:15], 64, "nf4", 8, None)
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096, got 48"):
            mm(x, packed, absmax, 48, "nf4", 8, None)
