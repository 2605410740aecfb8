"""QuantLinear: a drop-in nn.Linear over GPTQ-format buffers (reference backend)."""

import pytest
import torch

import lightllm
from lightllm.nn import QuantLinear
from lightllm.quantization import pack_gptq

BITS = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_linear(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_forward_equals_linear_on_the_dequantized_weight(bits, group_size, sym):
    lin = make_linear(160 if bits != 3 else 192, 64, seed=bits)
    q = QuantLinear.from_linear(lin, bits, group_size, sym=sym, checkpoint_format="gptq_v2")
    w = q.dequantize(torch.float64)
    assert w.shape == (64, lin.in_features)
    x = torch.randn(2, 3, lin.in_features, dtype=torch.float64)
    expected = x @ w.t() + q.bias.double()
    for dtype in DTYPES:
        y = q(x.to(dtype))
        assert y.shape == (2, 3, 64) and y.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # and the quantized layer approximates the original: error shrinks with the bit width
    rel = (q(x.float()) - lin(x.float())).norm() / lin(x.float()).norm()
    assert rel < {2: 1.0, 3: 0.5, 4: 0.25, 8: 0.02}[bits]


def test_state_dict_is_the_gptq_format_and_round_trips():
    lin = make_linear(256, 96)
    q = QuantLinear.from_linear(lin, 4, 128)
    sd = q.state_dict()
    assert list(sd) == ["qweight", "qzeros", "scales", "g_idx", "bias"]
    assert [sd[k].dtype for k in sd] == [torch.int32, torch.int32, torch.float16, torch.int32, torch.float16]
    assert sd["qweight"].shape == (32, 96) and sd["qzeros"].shape == (2, 12) and sd["scales"].shape == (2, 96)
    fresh = QuantLinear(256, 96, bits=4, group_size=128)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 256)
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuantLinear(256, 96, bits=3, group_size=128).load_state_dict(sd)


def test_loads_tensors_packed_elsewhere_with_act_order():
    # A checkpoint whose tensors were packed outside the module, with a non-monotone g_idx.
    k, n, gs = 128, 32, 32
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(1, 16, (k // gs, n), generator=gen)
    scales = torch.rand(k // gs, n, generator=gen).half() / 10
    g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).int()
    module = QuantLinear(k, n, 4, gs, bias=False)
    module.load_state_dict(pack_gptq(q, zeros, scales, g_idx, 4, "gptq"))
    dense = (scales.double()[g_idx.long()] * (q - zeros[g_idx.long()]).double()).t()
    x = torch.randn(3, k, dtype=torch.float64)
    torch.testing.assert_close(module(x.float()).double(), x @ dense.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_gives_the_input_gradient_only(dtype):
    lin = make_linear(64, 48)
    q = QuantLinear.from_linear(lin, 4, 32).to(torch.float32)
    x = torch.randn(4, 7, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 7, 48, dtype=dtype)
    q(x).backward(g)
    w = q.dequantize(torch.float64)
    expected = g.double() @ w
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert not any(b.requires_grad for b in q.buffers())


def test_dtype_and_device_moves_keep_it_working():
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    x = torch.randn(3, 64)
    ref = q(x)
    assert q.float().scales.dtype == torch.float32 and torch.allclose(q(x), ref, atol=1e-2)
    assert q.half().scales.dtype == torch.float16 and q(x.half()).dtype == torch.float16
    assert q.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert q.qweight.dtype == torch.int32 and q.g_idx.dtype == torch.int32  # integer buffers never cast
    assert q.to("cpu") is q


def test_extra_repr_and_no_bias():
    q = QuantLinear(256, 64, bits=3, group_size=64, bias=False)
    assert "bits=3" in repr(q) and "group_size=64" in repr(q)
    assert "bias" not in q.state_dict()
    assert q(torch.randn(2, 256)).shape == (2, 64)


def test_ops_pass_opcheck():
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    args = (q.qweight, q.qzeros, q.scales, q.g_idx)
    torch.library.opcheck(torch.ops.lightllm.gptq_dequantize.default, (*args, 4, True, torch.float32))
    x = torch.randn(5, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x, *args, q.bias.float(), 4, True))
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x.detach(), *args, None, 4, True))


def test_forced_backend_without_an_implementation_is_an_error():
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    if "cpp" not in lightllm.available_backends():
        pytest.skip("no native build")
    with lightllm.use_backend("cpp"):
        with pytest.raises(lightllm.BackendUnavailableError, match="gptq_matmul: backend 'cpp' has no implementation"):
            q(torch.randn(2, 64))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantLinear(64, 32, bits=5)
    with pytest.raises(ValueError, match="3-bit weights need in_features to be a positive multiple of 32.*got 48"):
        QuantLinear(48, 32, bits=3)
    with pytest.raises(ValueError, match="4-bit weights need out_features to be a positive multiple of 8.*got 12"):
        QuantLinear(64, 12, bits=4)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(64, 32, bits=4, group_size=0)
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    with pytest.raises(ValueError, match="last dimension is 65, expected in_features = 64"):
        q(torch.randn(2, 65))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.int64"):
        q(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="input is on meta but the layer is on cpu"):
        q(torch.randn(2, 64, device="meta"))
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored in the v1"):
        lin = make_linear(64, 32)
        with torch.no_grad():
            lin.weight.abs_()  # every group's minimum is >= 0, so asymmetric zeros are 0
        QuantLinear.from_linear(lin, 4, 32, sym=False, checkpoint_format="gptq")
