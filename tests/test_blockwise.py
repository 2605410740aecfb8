"""Block-wise 8-bit quantization: the map, the reference against independent oracles, every
backend against the reference, non-finite input and bad input."""

import math

import pytest
import torch

import lightllm
from lightllm import functional as F
from lightllm.ops.blockwise import dequantize_blockwise_reference, quantize_blockwise_reference

from conftest import cpu_backends, gpu_backends

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the test oracle (pip install -e .[test])")

BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_input(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # Mixed magnitudes so that many decades of the dynamic map are used.
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    return x.to(dtype).to(device)


# ---- the dynamic map ------------------------------------------------------------------------

@pytest.mark.parametrize("signed,exp_bits,total_bits", [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 3, 5), (True, 2, 4)])
def test_dynamic_map_equals_bitsandbytes(signed, exp_bits, total_bits):
    ours = F.create_dynamic_map(signed, exp_bits, total_bits)
    theirs = bnb.create_dynamic_map(signed, exp_bits, total_bits)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)


def test_dynamic_map_spec_facts():
    signed, unsigned = F.create_dynamic_map(True), F.create_dynamic_map(False)
    for m in (signed, unsigned):
        assert bool((m[1:] > m[:-1]).all()), "8-bit maps are strictly increasing"
        assert m[-1] == 1.0 and (m == 0).sum() == 1
    assert signed.min() > -1 and unsigned.min() == 0
    assert math.isclose(signed[signed > 0].min().item(), 5.5e-7, rel_tol=1e-3)
    assert math.isclose(unsigned[unsigned > 0].min().item(), 3.25e-7, rel_tol=1e-3)


def test_dynamic_map_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="max_exponent_bits"):
        F.create_dynamic_map(True, 8, 8)
    with pytest.raises(ValueError, match="gives"):
        F.create_dynamic_map(False, 4, 8)


# ---- the reference against independent oracles --------------------------------------------

@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("signed", [True, False])
def test_reference_picks_the_nearest_code(blocksize, signed):
    x = random_input((3, 1777), torch.float32, seed=blocksize)
    if not signed:
        x = x.abs()
    code = F.create_dynamic_map(signed)
    codes, absmax = quantize_blockwise_reference(x, code, blocksize)
    flat = torch.nn.functional.pad(x.reshape(-1), (0, (-x.numel()) % blocksize)).view(-1, blocksize)
    assert torch.equal(absmax, flat.abs().amax(1))
    # Brute force in float64: the chosen value is (one of) the nearest.
    v = (flat.double() * torch.where(absmax == 0, 0.0, 1.0 / absmax).double()[:, None]).reshape(-1)[: x.numel()]
    dist = (v[:, None] - code.double()[None, :]).abs()
    chosen = dist.gather(1, codes.reshape(-1, 1).long()).squeeze(1)
    assert bool((chosen <= dist.min(1).values * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_reference_agrees_with_bitsandbytes_cpu(dtype, blocksize):
    g = torch.Generator().manual_seed(7 + blocksize)
    x = torch.randn((70, 3001), generator=g).to(dtype)
    code = F.create_dynamic_map(True)
    codes, absmax = quantize_blockwise_reference(x, code, blocksize)
    theirs, state = bnb.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert torch.equal(absmax, state.absmax)
    # bitsandbytes' native CPU search is not exactly nearest: near a midpoint, and for the smallest
    # values (where the map's steps are finest) it can land up to a few codes away. Where the two
    # differ, ours is the nearer (or an equally near) value, and such values are rare.
    differ = (codes != theirs).reshape(-1)
    assert differ.float().mean() < 0.005
    v = (x.float().reshape(-1) / absmax.repeat_interleave(blocksize)[: x.numel()])[differ]
    ours_c, theirs_c = codes.reshape(-1)[differ].long(), theirs.reshape(-1)[differ].long()
    # (up to the rounding of the normalization: we multiply by 1/absmax, this test divides)
    slack = 4 * torch.finfo(torch.float32).eps * v.abs()
    assert bool(((v - code[ours_c]).abs() <= (v - code[theirs_c]).abs() + slack).all())
    # Dequantization of the same codes agrees exactly.
    ours_d = dequantize_blockwise_reference(theirs, absmax, code, blocksize, torch.float32)
    theirs_d = bnb.dequantize_blockwise(theirs, absmax=absmax, code=code, blocksize=blocksize)
    torch.testing.assert_close(ours_d, theirs_d.float(), rtol=0, atol=0)


# ---- every backend against the reference ----------------------------------------------------

SHAPES = [(1,), (255,), (257,), (3, 7, 83), (2, 4096), (5, 1000)]


def _skip_unsupported(backend, dtype, device="cpu"):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton CPU interpreter has no bfloat16; covered by the GPU tests")


def assert_same_as_reference(x, blocksize, backend, out_dtype=None):
    code = F.create_dynamic_map(True).to(x.device)
    with lightllm.use_backend("torch"):
        ref_codes, ref_absmax = F.quantize_blockwise(x, code, blocksize)
        ref_out = F.dequantize_blockwise(ref_codes, ref_absmax, code, blocksize, out_dtype or x.dtype)
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(x, code, blocksize)
        out = F.dequantize_blockwise(ref_codes, ref_absmax, code, blocksize, out_dtype or x.dtype)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and codes.is_contiguous()
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(x.numel() / blocksize),)
    exact = dict(rtol=0, atol=0, equal_nan=True)  # bit-for-bit, NaN where the reference has NaN
    torch.testing.assert_close(absmax, ref_absmax, **exact)
    mismatch = (codes != ref_codes).sum().item()
    assert mismatch == 0, f"{backend}: {mismatch} of {x.numel()} codes differ from the reference"
    assert out.dtype == (out_dtype or x.dtype) and out.shape == x.shape
    torch.testing.assert_close(out, ref_out, **exact)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference_cpu(backend, dtype, shape):
    _skip_unsupported(backend, dtype)
    blocksize = BLOCKSIZES[hash(shape) % len(BLOCKSIZES)]  # a seeded sample of the grid
    for bs in {blocksize, 64, 4096}:
        assert_same_as_reference(random_input(shape, dtype, seed=bs + len(shape)), bs, backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_backend_every_blocksize_cpu(backend, blocksize):
    assert_same_as_reference(random_input((3, 2 * blocksize + 37), torch.float32, seed=blocksize), blocksize, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_non_contiguous_cpu(backend):
    base = random_input((64, 301), torch.float16, seed=3)
    for x in (base.t(), base[:, ::3], base[1:, 5:]):
        assert not x.is_contiguous()
        assert_same_as_reference(x, 256, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_output_dtypes_cpu(backend):
    x = random_input((1000,), torch.float32, seed=11)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        _skip_unsupported(backend, out_dtype)
        assert_same_as_reference(x, 128, backend, out_dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_one_million_values_cpu(backend):
    assert_same_as_reference(random_input((1_000_003,), torch.float32, seed=1), 4096, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_unsigned_map_and_all_zero_block(backend):
    code = F.create_dynamic_map(False)
    x = random_input((3 * 256,), torch.float32, seed=5).abs()
    x[256:512] = 0
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(x, code, 256)
        out = F.dequantize_blockwise(codes, absmax, code, 256)
    assert absmax[1] == 0 and bool((codes[256:512] == 0).all()) and bool((out[256:512] == 0).all())
    ref_codes, ref_absmax = quantize_blockwise_reference(x, code, 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def custom_maps():
    return {
        "uniform": torch.linspace(-1, 1, 256),
        # crowded: most midpoints inside a few float buckets (the CPU kernel's tree fallback)
        "crowded": torch.cat([torch.linspace(-1, 0.3, 16), 0.3 + torch.linspace(1e-4, 0.01, 239), torch.ones(1)]),
        # repeated values (a 4-bit dynamic map padded to 256 with zeros, as bitsandbytes builds it)
        "padded_4bit": F.create_dynamic_map(True, 2, 4),
    }


def check_custom_map(backend, name, device):
    code = custom_maps()[name].float().contiguous().to(device)
    x = random_input((3, 1500), torch.float32, seed=29, device=device)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.3])
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(x, code, 512)
        out = F.dequantize_blockwise(codes, absmax, code, 512)
    ref_codes, ref_absmax = quantize_blockwise_reference(x, code, 512)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    assert torch.equal(out, dequantize_blockwise_reference(ref_codes, ref_absmax, code, 512, torch.float32))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", ["uniform", "crowded", "padded_4bit"])
def test_custom_maps_match_reference(backend, name):
    # The crowded and padded maps take the kernels' fallback search (a bucket holds > 4 midpoints).
    check_custom_map(backend, name, "cpu")


@pytest.mark.parametrize("backend", cpu_backends())
def test_roundtrip_error_is_within_half_a_step(backend):
    x = random_input((4, 999), torch.float32, seed=9)
    code = F.create_dynamic_map(True)
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(x, code, 256)
        out = F.dequantize_blockwise(codes, absmax, code, 256)
    # Worst case: half the widest gap, or the distance from +-1 to the map's ends.
    worst = max(((code[1:] - code[:-1]) / 2).max().item(), (code[0] + 1).item(), (1 - code[-1]).item())
    per_value_absmax = absmax.repeat_interleave(256)[: x.numel()].view(x.shape)
    assert bool(((out - x).abs() <= worst * per_value_absmax * (1 + 1e-5)).all())


@pytest.mark.parametrize("backend", cpu_backends())
def test_nonfinite_values_poison_only_their_block(backend):
    x = random_input((4 * 256,), torch.float32, seed=13)
    clean_codes, clean_absmax = quantize_blockwise_reference(x, F.create_dynamic_map(True), 256)
    x[10] = float("nan")
    x[300] = float("inf")
    x[600] = -float("inf")
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(x, blocksize=256)
        out = F.dequantize_blockwise(codes, absmax, blocksize=256)
    assert math.isnan(absmax[0]) and absmax[1] == float("inf") and absmax[2] == float("inf")
    assert not bool(torch.isfinite(out[:768]).any()), "every value of a poisoned block is non-finite"
    assert torch.equal(codes[768:], clean_codes[768:]) and absmax[3] == clean_absmax[3]
    ref_codes, _ = quantize_blockwise_reference(x, F.create_dynamic_map(True), 256)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_input(backend):
    with lightllm.use_backend(backend):
        codes, absmax = F.quantize_blockwise(torch.empty(0, 5), blocksize=64)
        out = F.dequantize_blockwise(codes, absmax, blocksize=64, dtype=torch.float16)
    assert codes.shape == (0, 5) and absmax.shape == (0,) and out.shape == (0, 5) and out.dtype == torch.float16


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x = random_input((3, 300), torch.float32, seed=17)
    code = F.create_dynamic_map(True)
    with lightllm.use_backend(backend):
        torch.library.opcheck(torch.ops.lightllm.quantize_blockwise.default, (x, code, 128))
        codes, absmax = F.quantize_blockwise(x, code, 128)
        torch.library.opcheck(torch.ops.lightllm.dequantize_blockwise.default, (codes, absmax, code, 128, torch.float16))


def test_torch_compile_traces_the_ops():
    code = F.create_dynamic_map(True)

    def roundtrip(x):
        codes, absmax = torch.ops.lightllm.quantize_blockwise(x, code, 256)
        return torch.ops.lightllm.dequantize_blockwise(codes, absmax, code, 256, torch.float32)

    x = random_input((5, 333), torch.float32, seed=19)
    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), roundtrip(x))


# ---- bad input ------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(1000)
    code = F.create_dynamic_map(True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*int32"):
        F.quantize_blockwise(torch.ones(10, dtype=torch.int32))
    for bad in (100, 32, 8192, 0, -64):
        with pytest.raises(ValueError, match=f"power of two from 64 to 4096, got {bad}"):
            F.quantize_blockwise(x, blocksize=bad)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        F.quantize_blockwise(x, blocksize=256.0)
    with pytest.raises(ValueError, match="256 values.*shape \\(255,\\)"):
        F.quantize_blockwise(x, code=code[:255])
    with pytest.raises(ValueError, match="float32 tensor of 256 values, got torch.float16"):
        F.quantize_blockwise(x, code=code.half())
    with pytest.raises(ValueError, match="sorted"):
        F.quantize_blockwise(x, code=code.flip(0))
    nan_map = code.clone()
    nan_map[3] = float("nan")
    with pytest.raises(ValueError, match="sorted"):
        F.quantize_blockwise(x, code=nan_map)
    with pytest.raises(ValueError, match="code is on meta but the data is on cpu"):
        F.quantize_blockwise(x, code=code.to("meta"))

    codes, absmax = F.quantize_blockwise(x, blocksize=256)
    with pytest.raises(ValueError, match=r"ceil\(1000 / 256\) = 4 values.*got 3"):
        F.dequantize_blockwise(codes, absmax[:3], blocksize=256)
    with pytest.raises(ValueError, match="absmax must hold"):
        F.dequantize_blockwise(codes, absmax, blocksize=128)
    with pytest.raises(TypeError, match="codes must be uint8"):
        F.dequantize_blockwise(codes.to(torch.int32), absmax, blocksize=256)
    with pytest.raises(TypeError, match="absmax must be float32"):
        F.dequantize_blockwise(codes, absmax.half(), blocksize=256)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        F.dequantize_blockwise(codes, absmax, blocksize=256, dtype=torch.int8)
    with pytest.raises(ValueError, match="absmax is on meta but codes are on cpu"):
        F.dequantize_blockwise(codes, absmax.to("meta"), blocksize=256)


def test_in_place_change_of_a_map_is_seen():
    # The sortedness check and the Triton midpoint table are cached per map; a write must invalidate.
    code = F.create_dynamic_map(True)
    x = torch.randn(512)
    F.quantize_blockwise(x, code=code, blocksize=256)
    code[0] = 5.0
    with pytest.raises(ValueError, match="sorted"):
        F.quantize_blockwise(x, code=code, blocksize=256)


def test_native_kernels_check_arguments_themselves():
    native = lightllm._native.cpp_module()
    if native is None:
        pytest.skip("lightllm._C is not built in this install")
    code = F.create_dynamic_map(True)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two from 64 to 4096, got 96"):
        native.quantize_blockwise(torch.randn(10), code, 96)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        native.quantize_blockwise(torch.ones(10, dtype=torch.int64), code, 64)
    with pytest.raises(RuntimeError, match="absmax must hold"):
        native.dequantize_blockwise(torch.zeros(100, dtype=torch.uint8), torch.ones(1), code, 64, torch.float32)
    cuda = lightllm._native.cuda_module()
    if cuda is not None:  # each module refuses the other's device, saying which one takes it
        with pytest.raises(RuntimeError, match="lightllm._C_cuda takes CUDA tensors, got one on cpu"):
            cuda.quantize_blockwise(torch.randn(10), code, 64)
        with pytest.raises(RuntimeError, match="absmax must hold"):
            cuda.dequantize_blockwise(torch.zeros(100, dtype=torch.uint8), torch.ones(1), code, 64, torch.float32)
        with pytest.raises(RuntimeError, match="lightllm._C_cuda takes CUDA tensors"):
            cuda.dequantize_blockwise(torch.zeros(100, dtype=torch.uint8), torch.ones(2), code, 64, torch.float32)


# ---- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_backend_matches_reference_gpu(backend, dtype, blocksize):
    for shape in SHAPES + [(1_000_003,)]:
        assert_same_as_reference(random_input(shape, dtype, seed=blocksize, device="cuda"), blocksize, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_backend_gpu_unaligned_large_and_nonfinite(backend):
    big = random_input((2**24 + 3,), torch.float32, seed=21, device="cuda")
    assert_same_as_reference(big[1:], 256, backend)  # storage offset breaks 16-byte alignment
    x = random_input((4 * 512,), torch.float32, seed=23, device="cuda")
    x[7], x[600], x[1100] = float("nan"), float("inf"), -float("inf")
    assert_same_as_reference(x, 512, backend)
    assert_same_as_reference(x.half(), 64, backend)
    for out_dtype in DTYPES:
        assert_same_as_reference(random_input((3, 999), torch.float32, seed=25, device="cuda"), 128, backend, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", ["uniform", "crowded", "padded_4bit"])
def test_custom_maps_match_reference_gpu(backend, name):
    check_custom_map(backend, name, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_unaligned_half_input_and_codes_gpu(backend):
    half = random_input((4101,), torch.float16, seed=31, device="cuda")[5:]  # starts at byte 10
    assert half.data_ptr() % 16 != 0
    assert_same_as_reference(half, 64, backend)
    code = F.create_dynamic_map(True).cuda()
    x = random_input((5000,), torch.float32, seed=33, device="cuda")
    ref_codes, ref_absmax = quantize_blockwise_reference(x, code, 128)
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8, device="cuda"), ref_codes])[3:]  # odd address
    with lightllm.use_backend(backend):
        out = F.dequantize_blockwise(shifted, ref_absmax, code, 128, torch.bfloat16)
    assert torch.equal(out, dequantize_blockwise_reference(ref_codes, ref_absmax, code, 128, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_opcheck_gpu(backend):
    x = random_input((3, 300), torch.float16, seed=17, device="cuda")
    code = F.create_dynamic_map(True).cuda()
    with lightllm.use_backend(backend):
        torch.library.opcheck(torch.ops.lightllm.quantize_blockwise.default, (x, code, 128))
        codes, absmax = F.quantize_blockwise(x, code, 128)
        torch.library.opcheck(torch.ops.lightllm.dequantize_blockwise.default, (codes, absmax, code, 128, torch.bfloat16))
