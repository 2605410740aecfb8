"""LoRA ops (lightllm/ops/lora.py): every backend against a float64 reference, forward and backward,
awkward shapes, the one-launch decode path, opcheck, bad input."""

import random

import pytest
import torch

import lightllm
from lightllm.ops import lora as ops_lora

from conftest import cpu_backends

DTYPES_CPU = [torch.float32, torch.float16]  # the Triton interpreter computes bf16 wrongly
DTYPES_GPU = [torch.float16, torch.bfloat16]


def make_case(m, k, n, r, dtype, device="cpu", seed=0, bias=True, conv1d=False, adapter_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    if conv1d:  # GPT-2's Conv1D stores [in, out]; the op gets the transposed view
        w = w.t().contiguous().t()
    b_ = (torch.randn(n, generator=gen) / 4).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(adapter_dtype)
    b = torch.randn(n, r, generator=gen).to(adapter_dtype)
    tensors = [x, w, b_, a, b]
    return [t if t is None else t.to(device) for t in tensors]


def exact(x, w, bias, a, b, scale):
    """y and S in float64."""
    s = x.double() @ a.double().t()
    y = x.double() @ w.double().t() + scale * s @ b.double().t()
    return (y if bias is None else y + bias.double()), s


def assert_close_to_exact(y, s, ref_y, x, w, bias, a, b, scale):
    ey, es = exact(x, w, bias, a, b, scale)
    eps = torch.finfo(x.dtype).eps
    err_ref = (ref_y.double() - ey).abs().max().item()
    err = (y.double() - ey).abs().max().item()
    # within twice the reference's error, or a few roundings of the output
    assert err <= max(2 * err_ref, 4 * eps * ey.abs().max().item()), (err, err_ref)
    assert y.dtype == x.dtype and y.shape == ey.shape
    assert s.dtype == torch.float32
    assert (s.double() - es).abs().max().item() <= 1e-5 * max(es.abs().max().item(), 1e-30)


def _grid(count, seed):
    """(m, k, n, r, dtype, bias, conv1d) cases: tokens 1, 2, 7, 33 (both sides of the decode limit),
    sizes that are not tile multiples, non-square layers, ranks 1, 3, 16 and one above a chunk."""
    rng = random.Random(seed)
    cases = [(1, 72, 40, 3, torch.float16, True, False), (7, 200, 130, 1, torch.float32, False, False),
             (33, 96, 50, 16, torch.float16, True, True), (2, 64, 300, 70, torch.float32, True, False)]
    while len(cases) < count:
        cases.append((rng.choice([1, 2, 7, 33]), rng.choice([40, 88, 136]), rng.choice([24, 72, 100]),
                      rng.choice([1, 3, 16]), rng.choice(DTYPES_CPU), rng.random() < 0.5, rng.random() < 0.3))
    return cases


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpp"])
@pytest.mark.parametrize("case", _grid(8, seed=0), ids=str)
def test_forward_matches_reference_cpu(backend, case):
    m, k, n, r, dtype, bias, conv1d = case
    x, w, b_, a, b = make_case(m, k, n, r, dtype, bias=bias, conv1d=conv1d, seed=m * n + r)
    ref_y, _ = ops_lora.lora_linear_reference(x, w, b_, a, b, 0.75)
    with lightllm.use_backend(backend):
        y, s = torch.ops.lightllm.lora_linear(x, w, b_, a, b, 0.75)
    assert_close_to_exact(y, s, ref_y, x, w, b_, a, b, 0.75)


def check_backward(backend, m, k, n, r, dtype, device, bias_grad=False):
    x, w, b_, a, b = make_case(m, k, n, r, dtype, device=device, seed=r + m)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    if bias_grad:
        b_.requires_grad_()
    with lightllm.use_backend(backend):
        y, _ = torch.ops.lightllm.lora_linear(x, w, b_, a, b, 0.5)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    inputs = [x, a, b] + ([b_] if bias_grad else [])
    got = torch.autograd.grad(y, inputs, grad)
    # float64 autograd of the formula
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    x64, a64, b64 = leaves[:3]
    bias64 = leaves[3] if bias_grad else b_.double()
    y64 = x64 @ w.double().t() + bias64 + 0.5 * (x64 @ a64.t()) @ b64.t()
    want = torch.autograd.grad(y64, leaves, grad.double())
    eps = torch.finfo(dtype).eps
    for name, g, e, t in zip(["x", "A", "B", "bias"], got, want, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        tol = 8 * eps * e.abs().max().item() * (1 if dtype == torch.float32 else 2) + 1e-30
        # the adapters' gradients are float32 sums of half-precision products: the inputs' eps rules
        assert (g.double() - e).abs().max().item() <= tol, (name, (g.double() - e).abs().max().item(), tol)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpp"])
@pytest.mark.parametrize("m,k,n,r", [(2, 72, 40, 3), (33, 96, 50, 16), (7, 40, 136, 1)])
@pytest.mark.parametrize("dtype", DTYPES_CPU)
def test_backward_matches_reference_cpu(backend, m, k, n, r, dtype):
    check_backward(backend, m, k, n, r, dtype, "cpu", bias_grad=m == 2)


def test_the_pieces_match_their_definitions():
    """lora_shrink, lora_matmul and lora_weight_grad of every CPU backend, on strided views."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 52, generator=gen).half()
    a = torch.randn(5, 52, generator=gen)
    w = torch.randn(52, 30, generator=gen).half().t()  # [30, 52], transposed view
    s = torch.randn(37, 5, generator=gen)
    b = torch.randn(5, 30, generator=gen).t()  # [30, 5], transposed view
    for backend in (b for b in cpu_backends() if b != "cpp"):
        with lightllm.use_backend(backend):
            got_s = torch.ops.lightllm.lora_shrink(x, a)
            got_y = torch.ops.lightllm.lora_matmul(x, w, None, s, b, 0.25)
            got_g = torch.ops.lightllm.lora_weight_grad(x, s, 2.0)
        e_s = x.double() @ a.double().t()
        e_y = x.double() @ w.double().t() + 0.25 * s.double() @ b.double().t()
        e_g = 2.0 * x.double().t() @ s.double()
        assert (got_s.double() - e_s).abs().max() <= 1e-5 * e_s.abs().max(), backend
        assert (got_y.double() - e_y).abs().max() <= 8 * torch.finfo(torch.float16).eps * e_y.abs().max(), backend
        assert (got_g.double() - e_g).abs().max() <= 1e-5 * e_g.abs().max(), backend
        assert got_s.dtype == got_g.dtype == torch.float32 and got_y.dtype == torch.float16


def test_triton_decode_split_reduction_is_deterministic_and_leaves_counters_zeroed():
    if "triton" not in cpu_backends():
        pytest.skip("triton cannot run here")
    from lightllm.kernels import _common
    from lightllm.kernels import lora as k

    x, w, b_, a, b = make_case(3, 320, 70, 5, torch.float16, seed=9)
    tiles = -(-70 // k._decode_blocks(x, a)[0])
    splits, _ = _common.split_plan(tiles, 320, k._decode_blocks(x, a)[1], x.device)
    assert splits > 1, "the case must exercise the split reduction"
    y1, s1 = k.lora_decode(x, w, b_, a, b, 0.5)
    y2, s2 = k.lora_decode(x, w, b_, a, b, 0.5)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert int(_common.split_counters(x.device, tiles)[:tiles].abs().sum()) == 0
    ref_y, _ = ops_lora.lora_linear_reference(x, w, b_, a, b, 0.5)
    assert_close_to_exact(y1, s1, ref_y, x, w, b_, a, b, 0.5)


def test_ops_pass_opcheck():
    x, w, b_, a, b = make_case(5, 24, 16, 3, torch.float32, seed=4)
    for t in (x, a, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lightllm.lora_linear.default, (x, w, b_, a, b, 0.5))
    torch.library.opcheck(torch.ops.lightllm.lora_linear.default, (x.detach(), w, None, a.detach(), b.detach(), 2.0))
    torch.library.opcheck(torch.ops.lightllm.lora_shrink.default, (x.detach(), a.detach()))
    s = torch.randn(5, 3)
    torch.library.opcheck(torch.ops.lightllm.lora_matmul.default, (x.detach(), w, b_, s, b.detach(), 0.5))
    torch.library.opcheck(torch.ops.lightllm.lora_matmul.default, (x.detach(), w, None, None, None, 0.0))
    torch.library.opcheck(torch.ops.lightllm.lora_weight_grad.default, (x.detach(), s, 0.5))


def test_eager_inference_skips_the_op_dispatch(monkeypatch):
    x, w, b_, a, b = make_case(3, 24, 16, 2, torch.float32)
    calls = []
    real = torch.ops.lightllm.lora_linear

    class Counting:
        def __call__(self, *args):
            calls.append("op")
            return real(*args)

    monkeypatch.setattr(torch.ops.lightllm, "lora_linear", Counting(), raising=False)
    with torch.no_grad():
        fast = ops_lora.lora_linear(x, w, b_, a, b, 0.5)
    assert calls == []
    slow = ops_lora.lora_linear(x, w, b_, a.requires_grad_(), b, 0.5)
    assert calls == ["op"] and torch.equal(fast, slow.detach())


def test_bad_input_raises_clear_errors():
    x, w, b_, a, b = make_case(3, 24, 16, 2, torch.float32)
    f = ops_lora.lora_linear
    with pytest.raises(ValueError, match=r"x must be \[tokens, in_features\], got shape \(3, 1, 24\)"):
        f(x[:, None], w, b_, a, b, 1.0)
    with pytest.raises(TypeError, match="weight is torch.float16 but x is torch.float32"):
        f(x, w.half(), b_, a, b, 1.0)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, in_features\] with in_features = 24"):
        f(x, w[:, :20], b_, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in_features\] = \[r, 24\] with r >= 1, got \(2, 23\)"):
        f(x, w, b_, a[:, :23], b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b must be \[out_features, r\] = \[16, 2\], got \(16, 3\)"):
        f(x, w, b_, a, torch.randn(16, 3), 1.0)
    with pytest.raises(TypeError, match="lora_a must be float32, float16 or bfloat16, got torch.int32"):
        f(x, w, b_, a.int(), b, 1.0)
    with pytest.raises(ValueError, match=r"bias must be a float \[16\] tensor"):
        f(x, w, b_[:3], a, b, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        f(x.long(), w, b_, a, b, 1.0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="lora_a is on cuda"):
            f(x, w, b_, a.cuda(), b, 1.0)


def test_native_decode_checks_its_arguments():
    native = lightllm._native.cuda_module()
    if native is None:
        pytest.skip(f"lightllm._C_cuda is not loaded: {lightllm._native.cuda_load_error}")
    x, w, b_, a, b = make_case(3, 24, 16, 2, torch.float16)
    with pytest.raises(RuntimeError, match="the CUDA kernel takes CUDA tensors"):
        native.lora_decode(x, w, b_, a, b, 1.0)


# ---- GPU -------------------------------------------------------------------------------------

def _need_kernel(backend, op=ops_lora.LINEAR):
    if not lightllm.backends.has_kernel(op, backend, "cuda"):
        pytest.skip(f"no {backend} kernel for {op} here: {lightllm.backends.why_unavailable(backend)}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 33, 512])
@pytest.mark.parametrize("r", [1, 3, 16, 64, 256])
def test_backend_matches_reference_gpu(backend, dtype, m, r):
    _need_kernel(backend)
    for k, n, conv1d in ((4096, 1056, False), (1032, 4104, False), (520, 776, True)):
        x, w, b_, a, b = make_case(m, k, n, r, dtype, device="cuda", seed=m + r, conv1d=conv1d)
        ref_y, _ = ops_lora.lora_linear_reference(x, w, b_, a, b, 0.5)
        with lightllm.use_backend(backend):
            y, s = torch.ops.lightllm.lora_linear(x, w, b_, a, b, 0.5)
        assert_close_to_exact(y, s, ref_y, x, w, b_, a, b, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("m", [3, 700])
def test_backward_matches_reference_gpu(backend, dtype, m):
    _need_kernel(backend)
    check_backward(backend, m, 1032, 776, 16, dtype, "cuda", bias_grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_replays_in_a_cuda_graph(backend):
    _need_kernel(backend)
    x, w, b_, a, b = make_case(4, 2048, 1024, 16, torch.float16, device="cuda")
    with lightllm.use_backend(backend):
        expected = ops_lora.lora_linear(x, w, b_, a, b, 0.5)  # eager once first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops_lora.lora_linear(x, w, b_, a, b, 0.5)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    with lightllm.use_backend(backend):
        again = ops_lora.lora_linear(x, w, b_, a, b, 0.5)
    assert not torch.equal(again, expected) and torch.equal(out, again)


def test_weight_gradient_and_the_functional_form():
    """A base weight that requires grad gets dW = dY^T X; functional.lora_linear takes leading dims."""
    from lightllm import functional as F

    x, w, b_, a, b = make_case(6, 24, 16, 2, torch.float32, seed=8)
    w.requires_grad_()
    y = F.lora_linear(x.view(2, 3, 24), w, b_, a, b, 0.5)
    assert y.shape == (2, 3, 16)
    grad = torch.randn(2, 3, 16)
    (gw,) = torch.autograd.grad(y, [w], grad)
    torch.testing.assert_close(gw, grad.reshape(6, 16).t() @ x, rtol=1e-5, atol=1e-5)
    ey, _ = exact(x, w.detach(), b_, a, b, 0.5)
    torch.testing.assert_close(y.detach().reshape(6, 16).double(), ey, rtol=1e-5, atol=1e-5)
