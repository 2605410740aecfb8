"""Bottleneck adapter ops (lightllm/ops/adapter.py): every backend against a float64 reference
written from the formula, forward and backward, awkward shapes (bottleneck 1, 7, 64, 256; widths off
the tiles; 1, 2, 7, 33 tokens), each activation, the one-launch decode path, opcheck, bad input."""

import random

import pytest
import torch

import lightllm
from lightllm import functional as F
from lightllm.ops import adapter as ops_adapter

from conftest import cpu_backends

DTYPES_CPU = [torch.float32, torch.float16]  # the Triton interpreter computes bf16 wrongly
DTYPES_GPU = [torch.float16, torch.bfloat16]
KERNEL_ACTIVATIONS = ["tanh", "relu", "gelu", "gelu_new", "silu", "sigmoid", "leakyrelu", "linear"]
BACKENDS = [b for b in cpu_backends() if b != "cpp"]


def make_case(m, k, n, b, dtype, device="cpu", seed=0, biases=True, adapter_dtype=torch.float32, scale=0.75):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, k, generator=gen).to(dtype)
    res = torch.randn(m, n, generator=gen).to(dtype)
    wd = (torch.randn(b, k, generator=gen) / k ** 0.5).to(adapter_dtype)
    bd = (torch.randn(b, generator=gen) / 4).to(adapter_dtype) if biases else None
    wu = (torch.randn(n, b, generator=gen) / b ** 0.5).to(adapter_dtype)
    bu = (torch.randn(n, generator=gen) / 4).to(adapter_dtype) if biases else None
    s = torch.tensor([scale])
    return [t if t is None else t.to(device) for t in (z, res, wd, bd, wu, bu, s)]


def formula(z, res, wd, bd, wu, bu, s, act):
    """The adapter by its definition, with torch's own activation modules (not the op's table)."""
    from transformers.activations import ACT2FN

    fn = (lambda t: torch.nn.functional.leaky_relu(t, 0.01)) if act == "leakyrelu" else ACT2FN[act]
    a = z @ wd.t() + (0 if bd is None else bd)
    return res + s * (fn(a) @ wu.t() + (0 if bu is None else bu)), a


def assert_close_to_exact(y, a, case, act):
    z, res, wd, bd, wu, bu, s = case
    ey, ea = formula(*[t if t is None else t.double() for t in case], act)
    eps = torch.finfo(res.dtype).eps
    assert y.dtype == res.dtype and y.shape == res.shape
    assert a.dtype == torch.float32 and a.shape == (z.shape[0], wd.shape[0])
    # y is rounded once to its dtype; the float32 arithmetic before it is far more accurate
    tol = (4 * eps if res.dtype != torch.float32 else 2e-5) * max(ey.abs().max().item(), 1.0)
    assert (y.double() - ey).abs().max().item() <= tol, ((y.double() - ey).abs().max().item(), tol)
    assert (a.double() - ea).abs().max().item() <= 2e-5 * max(ea.abs().max().item(), 1.0)


def _grid(count, seed):
    """(m, k, n, b, dtype, biases, act): tokens on both sides of the decode limit, widths that are
    not tile multiples, non-square, bottlenecks 1, 7, 64 and 256."""
    rng = random.Random(seed)
    cases = [(1, 72, 40, 7, torch.float16, True, "tanh"), (7, 40, 136, 1, torch.float32, False, "relu"),
             (33, 96, 50, 64, torch.float16, True, "silu"), (2, 64, 88, 256, torch.float32, True, "gelu"),
             (33, 40, 24, 7, torch.float32, True, "sigmoid"), (16, 24, 72, 17, torch.float16, False, "gelu_new")]
    while len(cases) < count:
        cases.append((rng.choice([1, 2, 7, 33]), rng.choice([40, 88, 136]), rng.choice([24, 72, 100]),
                      rng.choice([1, 7, 64]), rng.choice(DTYPES_CPU), rng.random() < 0.5,
                      rng.choice(KERNEL_ACTIVATIONS)))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _grid(12, seed=0), ids=str)
def test_forward_matches_the_formula(backend, case):
    m, k, n, b, dtype, biases, act = case
    tensors = make_case(m, k, n, b, dtype, biases=biases, seed=m * n + b)
    with lightllm.use_backend(backend):
        y, a = torch.ops.lightllm.bottleneck_adapter(*tensors, act)
    assert_close_to_exact(y, a, tensors, act)


@pytest.mark.parametrize("act", KERNEL_ACTIVATIONS)
def test_every_activation_on_both_triton_paths(act, monkeypatch):
    """Decode (<= 16 tokens, one launch) and the large path, asserting which kernel ran."""
    if "triton" not in BACKENDS:
        pytest.skip("triton cannot run here")
    from lightllm.kernels import adapter as k

    ran = []
    for fn in ("adapter_decode", "adapter_up"):
        real = getattr(k, fn)
        monkeypatch.setattr(k, fn, lambda *args, _real=real, _fn=fn, **kw: ran.append(_fn) or _real(*args, **kw))
    for m, want in ((3, "adapter_decode"), (21, "adapter_up")):
        ran.clear()
        tensors = make_case(m, 40, 24, 7, torch.float32, seed=m)
        with lightllm.use_backend("triton"):
            y, a = torch.ops.lightllm.bottleneck_adapter(*tensors, act)
        assert ran == [want]
        assert_close_to_exact(y, a, tensors, act)


def check_backward(backend, m, k, n, b, dtype, device, act, biases=True, learned=True):
    tensors = make_case(m, k, n, b, dtype, device=device, seed=b + m, biases=biases)
    z, res, wd, bd, wu, bu, s = tensors
    inputs = [t for t in (z, res, wd, bd, wu, bu) if t is not None] + ([s] if learned else [])
    for t in inputs:
        t.requires_grad_()
    with lightllm.use_backend(backend):
        y, _ = torch.ops.lightllm.bottleneck_adapter(z, res, wd, bd, wu, bu, s, act)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    got = torch.autograd.grad(y, inputs, grad)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(leaves)
    z64, res64, wd64 = next(it), next(it), next(it)
    bd64 = next(it) if biases else None
    wu64 = next(it)
    bu64 = next(it) if biases else None
    s64 = next(it) if learned else s.double()
    y64, _ = formula(z64, res64, wd64, bd64, wu64, bu64, s64, act)
    want = torch.autograd.grad(y64, leaves, grad.double())
    eps = torch.finfo(dtype).eps
    for i, (g, e, t) in enumerate(zip(got, want, inputs)):
        assert g.dtype == t.dtype and g.shape == t.shape, i
        # float32 sums of products of the inputs: a few of the inputs' roundings
        tol = 16 * eps * max(e.abs().max().item(), 1e-3)
        assert (g.double() - e).abs().max().item() <= tol, (i, (g.double() - e).abs().max().item(), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,n,b,act", [(2, 72, 40, 3, "tanh"), (33, 96, 50, 16, "silu"), (7, 40, 136, 1, "gelu"),
                                         (20, 24, 24, 64, "sigmoid")])
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_backward_matches_the_formula(backend, m, k, n, b, act, dtype):
    check_backward(backend, m, k, n, b, dtype, "cpu", act, biases=b != 1, learned=m != 7)


def test_decode_split_reduction_is_deterministic_and_leaves_counters_zeroed():
    if "triton" not in BACKENDS:
        pytest.skip("triton cannot run here")
    from lightllm.kernels import _common
    from lightllm.kernels import adapter as k

    tensors = make_case(3, 88, 70, 50, torch.float16, seed=9)
    block_n, block_b, _, _ = k._decode_blocks(70)
    assert -(-50 // k._block_b(50, block_b)) > 1, "the case must exercise the split reduction"
    code = k.ACTIVATIONS["tanh"]
    y1, a1 = k.adapter_decode(*tensors, code)
    y2, a2 = k.adapter_decode(*tensors, code)
    assert torch.equal(y1, y2) and torch.equal(a1, a2)
    tiles = -(-70 // block_n)
    assert int(_common.split_counters(tensors[0].device, tiles)[:tiles].abs().sum()) == 0
    assert_close_to_exact(y1, a1, tensors, "tanh")


def test_ops_pass_opcheck():
    z, res, wd, bd, wu, bu, s = make_case(5, 24, 16, 3, torch.float32, seed=4)
    for t in (z, wd, bd, wu, bu, s):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lightllm.bottleneck_adapter.default, (z, res, wd, bd, wu, bu, s, "tanh"))
    torch.library.opcheck(torch.ops.lightllm.bottleneck_adapter.default,
                          (z.detach(), res, wd.detach(), None, wu.detach(), None, s.detach(), "relu"))
    a = torch.randn(5, 3)
    grad = torch.randn(5, 16)
    torch.library.opcheck(torch.ops.lightllm.bottleneck_adapter_backward.default,
                          (grad, z.detach(), a, wd.detach(), wu.detach(), bu.detach(), s.detach(), "silu",
                           [True, True, True, True, True, True]))
    torch.library.opcheck(torch.ops.lightllm.bottleneck_adapter_backward.default,
                          (grad, z.detach(), a, wd.detach(), wu.detach(), None, s.detach(), "silu",
                           [True, False, False, True, False, False]))


def test_eager_inference_skips_the_op_dispatch(monkeypatch):
    tensors = make_case(3, 24, 16, 2, torch.float32)
    calls = []
    real = torch.ops.lightllm.bottleneck_adapter

    class Counting:
        def __call__(self, *args):
            calls.append("op")
            return real(*args)

    monkeypatch.setattr(torch.ops.lightllm, "bottleneck_adapter", Counting(), raising=False)
    with torch.no_grad():
        fast = ops_adapter.bottleneck_adapter(*tensors, "tanh")
    assert calls == []
    tensors[2].requires_grad_()
    slow = ops_adapter.bottleneck_adapter(*tensors, "tanh")
    assert calls == ["op"] and torch.equal(fast, slow.detach())


def test_functional_form_takes_leading_dimensions_and_a_number_as_scale():
    z, res, wd, bd, wu, bu, _ = make_case(6, 24, 16, 4, torch.float32, seed=8)
    y = F.bottleneck_adapter(z.view(2, 3, 24), res.view(2, 3, 16), wd, bd, wu, bu, 0.5, "gelu")
    assert y.shape == (2, 3, 16)
    ey, _ = formula(z.double(), res.double(), wd.double(), bd.double(), wu.double(), bu.double(), 0.5, "gelu")
    torch.testing.assert_close(y.reshape(6, 16).double(), ey, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_clear_errors():
    z, res, wd, bd, wu, bu, s = make_case(3, 24, 16, 2, torch.float32)
    f = ops_adapter.bottleneck_adapter
    with pytest.raises(ValueError, match=r"z must be \[tokens, K\] and res \[tokens, N\] with the same tokens"):
        f(z[:2], res, wd, bd, wu, bu, s, "tanh")
    with pytest.raises(TypeError, match="z and res must share a float dtype"):
        f(z, res.half(), wd, bd, wu, bu, s, "tanh")
    with pytest.raises(ValueError, match=r"down_weight must be \[bottleneck, K\] = \[b, 24\] with b >= 1, got \(2, 23\)"):
        f(z, res, wd[:, :23], bd, wu, bu, s, "tanh")
    with pytest.raises(ValueError, match=r"up_weight must be \[N, bottleneck\] = \[16, 2\], got \(16, 3\)"):
        f(z, res, wd, bd, torch.randn(16, 3), bu, s, "tanh")
    with pytest.raises(ValueError, match=r"down_bias must be \[2\], got \(3,\)"):
        f(z, res, wd, torch.randn(3), wu, bu, s, "tanh")
    with pytest.raises(ValueError, match="scale must be a float tensor of one element"):
        f(z, res, wd, bd, wu, bu, torch.ones(2), "tanh")
    with pytest.raises(TypeError, match="up_weight must be float32, float16 or bfloat16, got torch.int32"):
        f(z, res, wd, bd, wu.int(), bu, s, "tanh")
    with pytest.raises(ValueError, match="activation 'mish' is not one of"):
        f(z, res, wd, bd, wu, bu, s, "mish")
    with pytest.raises(TypeError, match="got torch.int64"):
        f(z.long(), res.long(), wd, bd, wu, bu, s, "tanh")
    with pytest.raises(ValueError, match="need the same leading dimensions"):
        F.bottleneck_adapter(z.view(3, 1, 24), res, wd, bd, wu, bu)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="down_weight is on cuda"):
            f(z, res, wd.cuda(), bd, wu, bu, s, "tanh")


# ---- GPU -------------------------------------------------------------------------------------

def _need_triton_gpu():
    if not lightllm.backends.has_kernel(ops_adapter.ADAPTER, "triton", "cuda"):
        pytest.skip(f"no triton kernel here: {lightllm.backends.why_unavailable('triton')}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 33, 512])
@pytest.mark.parametrize("b", [1, 7, 64, 256])
def test_triton_matches_the_formula_gpu(dtype, m, b):
    _need_triton_gpu()
    for k, n in ((4096, 4096), (1032, 4104), (4104, 1032)):
        tensors = make_case(m, k, n, b, dtype, device="cuda", seed=m + b)
        with lightllm.use_backend("triton"):
            y, a = torch.ops.lightllm.bottleneck_adapter(*tensors, "silu")
        assert_close_to_exact(y, a, tensors, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("m", [3, 700])
def test_triton_backward_matches_the_formula_gpu(dtype, m):
    _need_triton_gpu()
    check_backward("triton", m, 1032, 776, 64, dtype, "cuda", "tanh")


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph():
    _need_triton_gpu()
    tensors = make_case(4, 2048, 2048, 64, torch.float16, device="cuda")
    with lightllm.use_backend("triton"):
        expected = ops_adapter.bottleneck_adapter(*tensors, "tanh")  # eager once first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops_adapter.bottleneck_adapter(*tensors, "tanh")
    tensors[0].copy_(torch.randn_like(tensors[0]))
    graph.replay()
    torch.cuda.synchronize()
    with lightllm.use_backend("triton"):
        again = ops_adapter.bottleneck_adapter(*tensors, "tanh")
    assert not torch.equal(again, expected) and torch.equal(out, again)
