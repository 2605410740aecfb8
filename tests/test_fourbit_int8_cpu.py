"""The C++ CPU kernels of the bitsandbytes-format ops (csrc/fourbit_cpu.cpp, csrc/int8_cpu.cpp)
against the references on random data and awkward shapes, on this CPU's instruction set and on the
portable path (forced): quantize_4bit / dequantize_4bit and int8_linear at threshold 0 bit for bit,
matmul_4bit (and int8_linear with outlier columns) within twice the reference's own error against
float64, or 4 roundings of the output dtype."""

import pytest
import torch

import lightllm
from lightllm import _native
from lightllm.quantization.bnb import int8 as int8_format

pytestmark = pytest.mark.skipif(not _native.has_cpp(), reason=f"lightllm._C not loaded: {_native.load_error}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 4096]
# (N, K): K a multiple of every blocksize (the fused GEMV), of 32 but not 128 (its 32-value tail), and
# K where blocks straddle rows of the flat weight (96 at blocksize 64, 200 at every blocksize)
MATMUL_SHAPES = [(33, 4096), (40, 224), (40, 192), (40, 96), (24, 200), (17, 64)]
ROWS = [1, 2, 3, 7, 16, 17]


@pytest.fixture(params=["native", "portable"])
def isa(request):
    """Run a test on this CPU's kernels (AVX-512 here) and again on the portable ones."""
    module = _native.cpp_module()
    if request.param == "native" and module.bnb_cpu_isa() == "portable":
        pytest.skip("this CPU has no AVX-512: the native run is the portable one")
    module.bnb_cpu_force_portable(request.param == "portable")
    yield request.param
    module.bnb_cpu_force_portable(False)


@pytest.fixture(params=["gemv", "int_mm"])
def product(request, monkeypatch):
    """Where the int8 product comes from: csrc's VNNI GEMV, or torch._int_mm (oneDNN) from the
    first row on, whatever this CPU would choose (ops/int8.cpu_gemm_min_rows)."""
    from lightllm.ops import int8 as ops_int8

    monkeypatch.setattr(ops_int8, "CPU_GEMM_MIN_ROWS", 0 if request.param == "gemv" else 1)
    return request.param


def ops(backend, fn, *args):
    with lightllm.use_backend(backend):
        return fn(*args)


def within_reference_error(got, ref, exact):
    """check_backend's bar (tests/test_quant_linear.py): at most twice the reference's error against
    float64, or 4 roundings of the dtype at the output's scale."""
    assert got.dtype == ref.dtype and got.shape == ref.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    bound = max(2 * err_ref, 4 * torch.finfo(ref.dtype).eps * exact.abs().max().item())
    assert err <= bound, (err, err_ref, bound)


# ---- 4-bit --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_and_dequantize_are_the_references_bits(backend, quant_type, isa):
    q, dq = torch.ops.lightllm.quantize_4bit, torch.ops.lightllm.dequantize_4bit
    for blocksize in (32, 64, 128, 256, 1024, 4096):
        for dtype in DTYPES:
            for shape in [(1,), (7,), (33, 100), (40, 96), (3, 1001), (2, 4096 + 37)]:
                gen = torch.Generator().manual_seed(blocksize + len(shape))
                x = (torch.randn(shape, generator=gen) * 3).to(dtype)
                x.view(-1)[: blocksize] = 0  # an all-zero block (a short one for small tensors)
                x.view(-1)[-1:] = -x.view(-1)[-1:] * 1e-3
                n = x.numel()
                packed, absmax = ops(backend, q, x, blocksize, quant_type)
                ref_packed, ref_absmax = ops("torch", q, x, blocksize, quant_type)
                assert packed.shape == ((n + 1) // 2,) and absmax.shape == (-(-n // blocksize),)
                assert torch.equal(packed, ref_packed), (blocksize, dtype, shape, int((packed != ref_packed).sum()))
                assert torch.equal(absmax, ref_absmax)
                for out_dtype in DTYPES:
                    got = ops(backend, dq, packed, absmax, blocksize, quant_type, n, out_dtype)
                    assert torch.equal(got, ops("torch", dq, packed, absmax, blocksize, quant_type, n, out_dtype))


@pytest.mark.parametrize("backend", ["cpp"])
def test_quantize_ties_and_specials_are_the_references(backend, isa):
    """Values exactly on a midpoint between two codes take the lower one; NaN and inf blocks get what
    the reference gives them (the functional API refuses them; the op does not check)."""
    for quant_type in ("nf4", "fp4"):
        code = lightllm.functional.get_4bit_type(quant_type).sort().values
        mids = (code[:-1] + code[1:]) / 2
        x = torch.cat([mids, -mids, code, torch.tensor([1.0])]).repeat(3)  # absmax 1: the values are as scaled
        x = torch.cat([x, torch.full((64,), float("nan")), torch.full((64,), float("inf")), torch.zeros(64)])
        x[-64:-60] = torch.tensor([float("inf"), 1.0, -2.0, float("-inf")])
        for blocksize in (32, 64):
            got = ops(backend, torch.ops.lightllm.quantize_4bit, x, blocksize, quant_type)
            ref = ops("torch", torch.ops.lightllm.quantize_4bit, x, blocksize, quant_type)
            assert torch.equal(got[0], ref[0])
            assert torch.equal(got[1], ref[1]) or (got[1].isnan() == ref[1].isnan()).all()


def exact_matmul(x, w64, bias):
    y = x.double() @ w64.t()
    return y if bias is None else y + bias.to(x.dtype).double()


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_within_the_references_error(backend, quant_type, dtype, isa):
    """bfloat16 x runs twice: its vdpbf16ps kernel at every M, and x widened for the float32 kernel
    at every M (the CPU picks between them by M; csrc/fourbit_cpu.cpp bf16_kernel_min_rows)."""
    module = _native.cpp_module()
    for bf16_kernel_min_rows in ((1, 17) if dtype == torch.bfloat16 else (-1,)):
        previous = module.bnb_cpu_set_bf16_kernel_min_rows(bf16_kernel_min_rows)
        try:
            check_matmul_4bit(backend, quant_type, dtype)
        finally:
            module.bnb_cpu_set_bf16_kernel_min_rows(previous)


def check_matmul_4bit(backend, quant_type, dtype):
    q, dq, mm = torch.ops.lightllm.quantize_4bit, torch.ops.lightllm.dequantize_4bit, torch.ops.lightllm.matmul_4bit
    for blocksize in BLOCKSIZES:
        for n, k in MATMUL_SHAPES:
            gen = torch.Generator().manual_seed(n * k + blocksize)
            packed, absmax = ops("torch", q, torch.randn(n, k, generator=gen), blocksize, quant_type)
            w64 = ops("torch", dq, packed, absmax, blocksize, quant_type, n * k, torch.float64).view(n, k)
            bias = torch.randn(n, generator=gen) if n % 2 else None
            for m in ROWS:
                x = torch.randn(m, k, generator=gen).to(dtype)
                args = (x, packed, absmax, blocksize, quant_type, n, bias)
                got, ref = ops(backend, mm, *args), ops("torch", mm, *args)
                if m > 16:  # dequantize (the reference's bits) + torch's matmul: the reference itself
                    assert torch.equal(got, ref), (blocksize, n, k, m)
                else:
                    within_reference_error(got, ref, exact_matmul(x, w64, bias))


@pytest.mark.parametrize("backend", ["cpp"])
def test_matmul_4bit_shapes_and_layer(backend):
    """Leading dimensions of x are kept; Linear4bit's forward (double-quantized absmax, bf16 compute)
    runs the kernel; an empty input gives an empty output."""
    torch.manual_seed(0)
    layer = lightllm.nn.LinearNF4(256, 72, compute_dtype=torch.bfloat16)
    layer.load_state_dict(torch.nn.Linear(256, 72).state_dict())
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with lightllm.use_backend("torch"):
        ref = layer(x)
    with lightllm.use_backend(backend):
        got = layer(x)
        state = layer.quant_state
        empty = torch.ops.lightllm.matmul_4bit(torch.randn(0, 256), layer.weight.data.reshape(-1), state.float_absmax(),
                                               state.blocksize, state.quant_type, 72, None)
    assert got.shape == (2, 3, 72) and got.dtype == torch.bfloat16 and empty.shape == (0, 72)
    within_reference_error(got, ref, exact_matmul(x, layer.dequantize(torch.float64), layer.bias.detach()))


@pytest.mark.no_dispatch
@pytest.mark.parametrize("backend", ["cpp"])
def test_bad_4bit_input_is_a_value_error_naming_it(backend):
    x = torch.randn(4, 128)
    packed, absmax = ops("torch", torch.ops.lightllm.quantize_4bit, torch.randn(8, 128), 64, "nf4")
    q, dq, mm = torch.ops.lightllm.quantize_4bit, torch.ops.lightllm.dequantize_4bit, torch.ops.lightllm.matmul_4bit
    with lightllm.use_backend(backend):
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096, got 48"):
            q(x, 48, "nf4")
        with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Int"):
            q(torch.ones(8, dtype=torch.int32), 64, "nf4")
        with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
            q(x, 64, "int4")
        with pytest.raises(ValueError, match=r"packed holds 511 bytes; 1024 4-bit values need 512"):
            dq(packed[:-1], absmax, 64, "nf4", 1024, torch.float32)
        with pytest.raises(ValueError, match=r"absmax holds 16 values; 1024 values at blocksize 32 need 32"):
            dq(packed, absmax, 32, "nf4", 1024, torch.float32)
        with pytest.raises(ValueError, match=r"packed holds 512 bytes; 1152 4-bit values need 576"):
            mm(x, packed, absmax, 64, "nf4", 9, None)  # a weight of 9 x 128 would need more bytes
        with pytest.raises(ValueError, match="bias has 7 values, the layer has 8 outputs"):
            mm(x, packed, absmax, 64, "nf4", 8, torch.randn(7))
        with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Long"):
            mm(torch.ones(4, 128, dtype=torch.long), packed, absmax, 64, "nf4", 8, None)
        with pytest.raises(ValueError, match="absmax must be float32, got Half"):
            mm(x, packed, absmax.half(), 64, "nf4", 8, None)


# ---- LLM.int8 -------------------------------------------------------------------------------------

def int8_weight(n, k, seed):
    cb, scb, _ = int8_format.int8_vectorwise_quant(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).half())
    return cb, scb


def exact_int8(x, cb, scb, bias, threshold):
    """The reference's pipeline in float64 from its own codes: exact product, scaled, plus the 16-bit
    outlier columns against the dequantized int8 weight (rounded to x's dtype, as it does)."""
    a = x.reshape(-1, x.shape[-1])
    ca, sca, cols = int8_format.int8_vectorwise_quant(a.half(), threshold)
    y = (ca.double() @ cb.double().t()) * (sca.double()[:, None] * scb.double()[None, :]) / 127 ** 2
    if bias is not None:
        y = y + bias.to(x.dtype).double()
    if cols is not None and cols.numel():
        y = y + a[:, cols].double() @ int8_format.int8_vectorwise_dequant(cb[:, cols], scb).to(x.dtype).double().t()
    return y


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_is_the_references_bits_at_threshold_zero(backend, dtype, isa, product):
    op = torch.ops.lightllm.int8_linear
    for n, k in [(33, 4096), (40, 96), (24, 200), (17, 64), (9, 1000)]:
        cb, scb = int8_weight(n, k, n + k)
        bias = torch.randn(n) if n % 2 else None
        for m in ROWS + [40]:
            x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(dtype)
            x[0, :3] = torch.tensor([0.0, 1e-4, -65000.0]).to(dtype)[: min(3, k)]  # a huge value flattens row 0
            if m > 2:
                x[2] = 0  # an all-zero row: stats 0, codes 0
            got, ref = ops(backend, op, x, cb, scb, bias, 0.0), ops("torch", op, x, cb, scb, bias, 0.0)
            assert torch.equal(got, ref), (n, k, m, int((got != ref).sum()))


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_with_outlier_columns(backend, dtype, isa, product):
    """threshold > 0: outlier columns found per call, their 16-bit product added; the reference's
    bits when a call finds none."""
    op = torch.ops.lightllm.int8_linear
    for n, k in [(33, 4096), (40, 96), (24, 200)]:
        cb, scb = int8_weight(n, k, n * k)
        bias = torch.randn(n)
        for m in ROWS:
            x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)) * 1.5).to(dtype)
            x[::2, 5] = 20.0  # systematic outlier features
            x[-1, k - 1] = -7.5
            for threshold in (6.0, 3.3):
                got, ref = ops(backend, op, x, cb, scb, bias, threshold), ops("torch", op, x, cb, scb, bias, threshold)
                within_reference_error(got, ref, exact_int8(x, cb, scb, bias, threshold))
            calm = x.clamp(-5, 5)
            assert torch.equal(ops(backend, op, calm, cb, scb, bias, 6.0), ops("torch", op, calm, cb, scb, bias, 6.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_gemv_and_int_mm_products_give_the_same_bits(dtype, isa, monkeypatch):
    """The two sources of the exact int32 product share one epilogue: equal outputs bit for bit,
    with outlier columns, a bias, NaN and inf in x and LoRA's rank-r term, on awkward shapes."""
    from lightllm.ops import int8 as ops_int8

    module = _native.cpp_module()
    for n, k in [(33, 4096), (40, 96), (24, 200), (130, 77)]:
        cb, scb = int8_weight(n, k, 7 * n + k)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        s = torch.randn(40, 4, generator=torch.Generator().manual_seed(k))
        lora_b = torch.randn(n, 4, generator=torch.Generator().manual_seed(n + 1)).to(dtype)
        for m in (1, 5, 16, 40):
            x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k * m)) * 2).to(dtype)
            x[::3, 1] = 12.0
            if m > 4:
                x[3, 2], x[4, 0] = float("inf"), float("nan")
            for threshold in (0.0, 6.0):
                for lora in (False, True):
                    extra = (s[:m], lora_b, 0.5) if lora else ()
                    outs = [module.int8_linear(x, cb, scb, bias, threshold, *extra, gemm_min_rows=rows)
                            for rows in (0, 1)]
                    assert torch.equal(outs[0], outs[1]) or (
                        torch.equal(outs[0].isnan(), outs[1].isnan())
                        and torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())), (n, k, m, threshold, lora)
                    # and the automatic choice is one of the two
                    monkeypatch.setattr(ops_int8, "CPU_GEMM_MIN_ROWS", None)
                    assert ops_int8.cpu_gemm_min_rows() in (0, 9, 17)


@pytest.mark.parametrize("backend", ["cpp"])
def test_int8_threshold_is_compared_in_float16(backend):
    """torch compares the float16 activations with the threshold rounded to float16: 3.3012 becomes
    3.30078125, so a value of exactly 3.30078125 is an outlier although it is below 3.3012."""
    op = torch.ops.lightllm.int8_linear
    cb, scb = int8_weight(24, 64, 3)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    x[1, 10] = 3.30078125
    _, _, cols = int8_format.int8_vectorwise_quant(x.half(), 3.3012)
    assert cols.tolist() == [10]
    got, ref = ops(backend, op, x, cb, scb, None, 3.3012), ops("torch", op, x, cb, scb, None, 3.3012)
    within_reference_error(got, ref, exact_int8(x, cb, scb, None, 3.3012))
    # treated as an int8 column instead, the whole of row 1 would be quantized against 3.3 as its max
    wrong = ops("torch", op, x, cb, scb, None, 3.31)
    assert (got.double() - exact_int8(x, cb, scb, None, 3.3012)).abs().max() < \
        (wrong.double() - exact_int8(x, cb, scb, None, 3.3012)).abs().max()


@pytest.mark.no_dispatch
@pytest.mark.parametrize("backend", ["cpp"])
def test_bad_int8_input_is_a_value_error_naming_it(backend):
    op = torch.ops.lightllm.int8_linear
    cb, scb = int8_weight(8, 64, 0)
    x = torch.randn(2, 64)
    with lightllm.use_backend(backend):
        with pytest.raises(ValueError, match=r"x has 63 features, CB of shape \[8, 64\] takes 64"):
            op(torch.randn(2, 63), cb, scb, None, 0.0)
        with pytest.raises(ValueError, match="CB must be a 2-D int8 weight"):
            op(x, cb.float(), scb, None, 0.0)
        with pytest.raises(ValueError, match=r"SCB must hold one float32 absmax per output row \(8\)"):
            op(x, cb, scb[:4], None, 0.0)
        with pytest.raises(ValueError, match="bias has 3 values, the layer has 8 outputs"):
            op(x, cb, scb, torch.randn(3), 0.0)
        with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16, got Int"):
            op(torch.ones(2, 64, dtype=torch.int32), cb, scb, None, 0.0)


@pytest.mark.parametrize("n_codes, nested_blocksize", [(1000, 256), (4097, 64), (300, 4096), (513, 32)])
def test_cpp_backends_decode_the_nested_absmax_as_the_reference(n_codes, nested_blocksize):
    """The C++ 4-bit backends decode a double-quantized absmax with csrc's block-wise dequantization
    (not torch's gather): bit for bit decode_nested_absmax, with short last blocks; a nested
    blocksize that kernel does not take (32) goes through the reference."""
    from lightllm import functional as LF
    from lightllm.ops import fourbit
    from lightllm.ops.blockwise import quantize_blockwise_reference

    gen = torch.Generator().manual_seed(n_codes)
    absmax = torch.rand(n_codes, generator=gen) * 3 + 0.01
    offset = absmax.mean()
    code = LF.create_dynamic_map(signed=True)
    codes, nested_absmax = quantize_blockwise_reference(absmax - offset, code, nested_blocksize)  # any blocksize
    want = fourbit.decode_nested_absmax(codes, nested_absmax, code, nested_blocksize, offset)
    got = fourbit._decode_nested_absmax_cpp(codes, nested_absmax, code, nested_blocksize, offset)
    assert got.dtype == torch.float32 and torch.equal(got, want)
