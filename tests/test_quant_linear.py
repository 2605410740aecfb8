"""QuantLinear: a drop-in nn.Linear over GPTQ-format buffers (reference backend)."""

import pytest
import torch

import lightllm
from lightllm.nn import QuantLinear
from lightllm.quantization import pack_gptq, unpack_gptq

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
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x, *args, q.bias.float(), None, None, None, 0.0, 4, True))
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x.detach(), *args, None, None, None, None, 0.0, 4, True))
    s, b, a = torch.randn(5, 3), torch.randn(32, 3), torch.randn(3, 64)
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x, *args, None, None, s, b, 0.5, 4, True))
    torch.library.opcheck(torch.ops.lightllm.gptq_matmul.default, (x, *args, None, a, None, b, 0.5, 4, True))
    a, b = a.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.lightllm.gptq_lora_linear.default, (x, *args, q.bias, a, b, 0.5, 4, True))


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("rank", [1, 3, 16, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("given", ["s", "a"])  # S = x A^T given, or computed in the kernel from A
def test_lora_epilogue(backend, rank, dtype, given):
    if backend not in lightllm.available_backends():
        pytest.skip(f"{backend} cannot run here")
    q = QuantLinear.from_linear(make_linear(96, 64, seed=rank), 4, 32)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(7, 96, generator=gen).to(dtype)
    a = torch.randn(rank, 96, generator=gen) / 10  # float32, as PEFT keeps adapters
    s = x.float() @ a.t()  # float32, as LoRA's S = x A^T is kept
    b = torch.randn(64, rank, generator=gen).to(dtype)
    lora = (None, s) if given == "s" else (a, None)
    with lightllm.use_backend(backend):
        y = torch.ops.lightllm.gptq_matmul(x, q.qweight, q.qzeros, q.scales, q.g_idx, q.bias, *lora, b, 0.25, 4, True)
    exact = (x.double() @ q.dequantize(torch.float64).t() + q.bias.double()
             + 0.25 * (x.double() @ a.double().t()) @ b.double().t())
    tol = 4 * torch.finfo(dtype).eps * exact.abs().max().item() * (1 if dtype == torch.float32 else 4)
    assert y.dtype == dtype and (y.double() - exact).abs().max().item() <= tol


def test_ops_without_a_kernel_in_the_chosen_backend_run_their_default(caplog, monkeypatch):
    # QLoRA under "cpp": S = x A^T (lora_shrink) has no C++ kernel and runs its default, the
    # reference, saying so once; the GPTQ matmul and the backward's dequantization are C++ kernels.
    monkeypatch.setattr(lightllm.backends, "_fallbacks_logged", set())  # "once" per process
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    if "cpp" not in lightllm.available_backends():
        pytest.skip("no native build")
    x = torch.randn(2, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    with caplog.at_level("INFO", logger="lightllm"), lightllm.use_backend("cpp"), \
            lightllm.backends.record_dispatches() as calls:
        q.lora_linear(x, a, b, 0.5).sum().backward()
        w = q.dequantize()
    assert "lora_shrink has no 'cpp' kernel; running its default 'torch' instead" in caplog.text
    ran = {(call.op, call.ran) for call in calls}
    assert {("gptq_matmul", "cpp"), ("gptq_dequantize", "cpp"), ("lora_shrink", "torch")} <= ran, ran
    assert torch.equal(w, q.dequantize()) and x.grad is not None and a.grad is not None


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


def test_asymmetric_v1_keeps_zeros_storable():
    # All weights positive: the asymmetric grid wants z = 0, which v1 (stored z - 1) cannot hold.
    # v1 layers keep z >= 1 (the top level is lost instead); v2 layers use z = 0.
    lin = make_linear(64, 32)
    with torch.no_grad():
        lin.weight.abs_()
    dense = lin.weight.detach()
    for fmt, zero in (("gptq", 1), ("gptq_v2", 0)):
        q = QuantLinear.from_linear(lin, 4, 32, sym=False, checkpoint_format=fmt)
        z = unpack_gptq(q.qweight, q.qzeros, q.scales, q.g_idx, 4, fmt)["zeros"]
        assert int(z.min()) == zero
        scale = q.scales.float()[q.g_idx.long()].t()
        assert torch.all((q.dequantize(torch.float32) - dense).abs() <= scale * (1.02 if zero else 0.52) + 1e-6)  # fp16 scales: ~1% slack


def act_order_checkpoint(k=128, n=32, gs=32, bits=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(1, 2**bits, (-(-k // gs), n), generator=gen)
    scales = torch.rand(-(-k // gs), n, generator=gen).half() / 10
    g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).int()
    dense = (scales.double()[g_idx.long()] * (q - zeros[g_idx.long()]).double()).t()
    return pack_gptq(q, zeros, scales, g_idx, bits, "gptq"), dense


def test_act_order_keeps_one_permuted_copy_and_saves_the_checkpoint_layout():
    packed, dense = act_order_checkpoint()
    module = QuantLinear(128, 32, 4, 32, bias=False)
    module.load_state_dict(packed)
    assert not torch.equal(module.qweight, packed["qweight"]), "the kernel layout replaces the checkpoint layout"
    assert bool((module.g_idx[1:] >= module.g_idx[:-1]).all())
    saved = module.state_dict()
    assert torch.equal(saved["qweight"], packed["qweight"]) and torch.equal(saved["g_idx"], packed["g_idx"])
    torch.testing.assert_close(module.dequantize(torch.float64), dense, rtol=0, atol=0)
    x = torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close(module(x.float()).double(), x @ dense.t(), rtol=1e-5, atol=1e-5)
    module.float()  # cast: still in kernel layout, no re-permutation
    torch.testing.assert_close(module(x.float()).double(), x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_buffers_written_from_outside_are_rearranged():
    packed, dense = act_order_checkpoint(seed=2)
    module = QuantLinear(128, 32, 4, 32, bias=False)
    module.load_state_dict(act_order_checkpoint(seed=3)[0])
    with torch.no_grad():
        for name, tensor in packed.items():
            getattr(module, name).copy_(tensor)  # checkpoint layout, written in place
    x = torch.randn(2, 128, dtype=torch.float64)
    torch.testing.assert_close(module(x.float()).double(), x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(module.state_dict()["qweight"], packed["qweight"])


def test_act_order_backward():
    packed, dense = act_order_checkpoint(seed=4)
    module = QuantLinear(128, 32, 4, 32, bias=False)
    module.load_state_dict(packed)
    x = torch.randn(5, 128, requires_grad=True)
    g = torch.randn(5, 32)
    module(x).backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ dense, rtol=1e-5, atol=1e-5)


# ---- every backend against the reference ----------------------------------------------------

def _grid(seed, count):
    """A seeded sample of bits x group size x sym x act-order x M x dtype (the interpreter is slow)."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    cases = []
    for bits in BITS:  # every bit width at least twice
        for _ in range(count):
            cases.append((bits, pick([32, 64, 128, -1]), pick([True, False]), pick([True, False]),
                          pick([1, 2, 3, 7, 16, 33]), pick([torch.float32, torch.float16])))
    return cases


def check_backend(backend, bits, group_size, sym, act_order, m, dtype, device, k=None, n=None):
    k = k or (96 if bits == 3 else 80)  # not multiples of the tiles (3-bit packing needs 32 | K and N)
    n = n or 96
    lin = make_linear(k, n, seed=bits + m)
    module = QuantLinear.from_linear(lin, bits, group_size, sym=sym, checkpoint_format="gptq_v2").to(device)
    if act_order:
        state = module.state_dict()
        gs = k if group_size == -1 else group_size
        state["g_idx"] = (torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(m))) // gs).int().to(device)
        module.load_state_dict(state)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).to(dtype).to(device)
    with lightllm.use_backend("torch"):
        ref = module(x)
    with lightllm.use_backend(backend):
        out = module(x)
    # Same dequantized weight, same input: the difference is the accumulation order only.
    w = module.dequantize(torch.float64)
    exact = x.double() @ w.t() + module.bias.double()
    err_ref = (ref.double() - exact).abs().max().item()
    err_out = (out.double() - exact).abs().max().item()
    eps = torch.finfo(dtype).eps
    assert err_out <= max(2 * err_ref, 4 * eps * exact.abs().max().item()), (err_out, err_ref)


@pytest.mark.parametrize("case", _grid(seed=0, count=2), ids=str)
def test_triton_matches_reference_cpu(case):
    if "triton" not in lightllm.available_backends():
        pytest.skip("triton cannot run here (not installed, or no TRITON_INTERPRET on a CPU-only machine)")
    check_backend("triton", *case, device="cpu")


def _need_gpu_kernel(backend, op="gptq_matmul"):
    if not lightllm.backends.has_kernel(op, backend, "cuda"):
        pytest.skip(f"no {backend} kernel for {op} here: {lightllm.backends.why_unavailable(backend)}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_backend_matches_reference_gpu(backend, bits, group_size, sym, act_order):
    _need_gpu_kernel(backend)
    for m in (1, 3, 8, 9, 33, 128):  # both sides of the CUDA GEMV limit (8 rows)
        for dtype in DTYPES:
            check_backend(backend, bits, group_size, sym, act_order, m, dtype, "cuda", k=4160, n=1056)


def test_quantize_linears_rtn_replaces_layers_in_place():
    from lightllm.quantization import quantize_linears_rtn

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("block", torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)))
    model.add_module("odd", torch.nn.Linear(64, 20))  # 20 outputs: no 4-bit packed layout
    model.add_module("lm_head", torch.nn.Linear(20, 32))
    x = torch.randn(3, 64)
    dense = model(x)
    quantize_linears_rtn(model, bits=4, group_size=32, progress=False)
    assert isinstance(model.block[0], QuantLinear) and isinstance(model.block[2], QuantLinear)
    assert type(model.odd) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear
    out = model(x)
    assert (out - dense).norm() / dense.norm() < 0.1


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("bits", [3, 4])
def test_triton_split_k(split_k, bits):
    """The K-sliced launch (used at small M on a GPU) adds its slices and the epilogue exactly once."""
    if "triton" not in lightllm.available_backends():
        pytest.skip("triton cannot run here")
    from lightllm.kernels.gptq import gptq_matmul

    q = QuantLinear.from_linear(make_linear(224, 64, seed=split_k), bits, 32)
    x = torch.randn(3, 224, dtype=torch.float16)
    a, b = torch.randn(4, 224) / 10, torch.randn(64, 4, dtype=torch.float16)
    s = x.float() @ a.t()
    exact = x.double() @ q.dequantize(torch.float64).t() + q.bias.double() + 0.5 * s.double() @ b.double().t()
    for lora in ({"lora_s": s}, {"lora_a": a}):  # S given, or computed per K slice in the kernel
        y = gptq_matmul(x, q.qweight, q.qzeros, q.scales, q.g_idx, q.bias, bits, True, lora_b=b, lora_scale=0.5,
                        split_k=split_k, **lora)
        assert y.dtype == torch.float16
        assert (y.double() - exact).abs().max().item() <= 8 * torch.finfo(torch.float16).eps * exact.abs().max().item()


def check_triton_dequantize(bits, act_order, dtype, device, backend="triton"):
    k, n = (96, 64) if bits == 3 else (80, 48)
    module = QuantLinear.from_linear(make_linear(k, n, seed=bits), bits, 40, sym=False, checkpoint_format="gptq_v2")
    if act_order:
        state = module.state_dict()
        state["g_idx"] = (torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(bits))) // 40).int()
        module.load_state_dict(state)
    module.to(device)
    with lightllm.use_backend("torch"):
        ref = module.dequantize(dtype)
    with lightllm.use_backend(backend):
        out = module.dequantize(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter rounds bf16 wrongly
def test_triton_dequantize_matches_reference(bits, act_order, dtype):
    if "triton" not in lightllm.available_backends():
        pytest.skip("triton cannot run here")
    check_triton_dequantize(bits, act_order, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference_gpu(backend, bits, act_order, dtype):
    _need_gpu_kernel(backend, "gptq_dequantize")
    check_triton_dequantize(bits, act_order, dtype, "cuda", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits", [3, 4])
def test_large_m_dequantize_then_gemm_gpu(backend, bits):
    from lightllm.kernels.gptq import DEQUANTIZE_THEN_GEMM_ROWS

    _need_gpu_kernel(backend)
    check_backend(backend, bits, 128, False, True, DEQUANTIZE_THEN_GEMM_ROWS + 3, torch.float16, "cuda", k=4160, n=1056)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_lora_epilogue_gpu(backend, m):
    _need_gpu_kernel(backend)
    q = QuantLinear.from_linear(make_linear(4096, 1024, seed=m), 4, 128).cuda()
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 4096, generator=gen).half().cuda()
    s = torch.randn(m, 16, generator=gen).cuda()
    b = torch.randn(1024, 16, generator=gen).half().cuda()
    with lightllm.use_backend(backend):
        y = torch.ops.lightllm.gptq_matmul(x, q.qweight, q.qzeros, q.scales, q.g_idx, q.bias, None, s, b, 0.5, 4, True)
        a = torch.randn(16, 4096, generator=gen).cuda() / 64
        y_a = torch.ops.lightllm.gptq_matmul(x, q.qweight, q.qzeros, q.scales, q.g_idx, q.bias, a, None, b, 0.5, 4, True)
    exact = x.double() @ q.dequantize(torch.float64).t() + q.bias.double() + 0.5 * s.double() @ b.double().t()
    assert (y.double() - exact).abs().max().item() <= 8 * torch.finfo(torch.float16).eps * exact.abs().max().item()
    exact = (x.double() @ q.dequantize(torch.float64).t() + q.bias.double()
             + 0.5 * (x.double() @ a.double().t()) @ b.double().t())
    assert (y_a.double() - exact).abs().max().item() <= 8 * torch.finfo(torch.float16).eps * exact.abs().max().item()


def test_native_gptq_kernels_check_their_arguments():
    native = lightllm._native.cuda_module()
    if native is None:
        pytest.skip(f"lightllm._C_cuda is not loaded: {lightllm._native.cuda_load_error}")
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8, got 5"):
        native.gptq_dequantize(q.qweight, q.qzeros, q.scales, q.g_idx, 5, True, torch.float16)
    with pytest.raises(RuntimeError, match="the CUDA kernels take CUDA tensors"):
        native.gptq_matmul(torch.randn(2, 64), q.qweight, q.qzeros, q.scales, q.g_idx, None, None, None, None, 0.0, 4, True)


def test_g_idx_out_of_range_is_refused_at_load():
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    state = q.state_dict()
    state["g_idx"] = state["g_idx"].clone()
    state["g_idx"][5] = 7
    target = QuantLinear.from_linear(make_linear(64, 32, seed=1), 4, 32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"g_idx holds groups 0..7 but scales and qzeros hold 2 groups"):
        target.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a failed load changes nothing"


def test_eager_fast_path_and_op_path_agree(monkeypatch):
    from lightllm.ops import gptq as ops_gptq

    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    x = torch.randn(3, 64)
    calls = []
    real = torch.ops.lightllm.gptq_matmul

    class CountingOps:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

        def __call__(self, *args):
            calls.append("op")
            return real(*args)

    monkeypatch.setattr(torch.ops.lightllm, "gptq_matmul", CountingOps(), raising=False)
    with torch.no_grad():
        fast = q(x)
    assert calls == [], "inference without autograd or tracing skips the op's dispatch"
    slow = q(x.requires_grad_())
    assert calls == ["op"], "with autograd the custom op runs"
    assert torch.equal(fast, slow.detach())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.no_grad():
        assert ops_gptq._op_boundary_needed(mode.from_tensor(x))


def test_torch_compile_of_a_quant_linear():
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    x = torch.randn(3, 64)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


# ---- the C++ CPU kernels (lightllm._C: AVX-512, AVX2 or scalar, chosen at run time) ----------

def _cpp():
    native = lightllm._native.cpp_module()
    if native is None:
        pytest.skip(f"lightllm._C is not loaded: {lightllm._native.load_error}")
    return native


CPP_ISAS = ["avx512bf16", "avx512", "avx2", "scalar"]
# (K, N) per bit width: K, N not multiples of the kernels' tiles (16 columns a vector, 16 to 64 a
# tile), N not of 16 where the packing allows (2 bits needs 16 | N, 3 bits 32 | K and N); the
# second shape has groups longer than the kernel's 128-value segments and several column tiles.
CPP_SHAPES = {2: [(80, 48), (400, 112)], 3: [(96, 96), (288, 160)], 4: [(72, 40), (264, 104)],
              8: [(68, 36), (260, 100)]}
CPP_M = [1, 2, 3, 7, 16, 17, 33, 48]  # up to 3 row blocks (M = 257, dequantize + GEMM: through QuantLinear below)


def _random_gptq(k, n, bits, group_size, layout, sym, v1, seed):
    """Packed GPTQ tensors from random codes. layout: "seq" (sequential groups), "sorted" (groups
    contiguous, as QuantLinear's kernel layout keeps them, but of random unequal lengths: segment
    boundaries inside packed words) or "scattered" (act-order as stored: each group's rows spread
    over K)."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1))
    else:
        zeros = torch.randint(1 if v1 else 0, 2**bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) / 8 + 0.01).half()
    g_idx = torch.arange(k) // gs
    if layout == "sorted":
        g_idx = torch.randint(0, groups, (k,), generator=gen).sort().values
    elif layout == "scattered":
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return pack_gptq(q, zeros, scales, g_idx.int(), bits, "gptq" if v1 else "gptq_v2")


def _check_cpp_case(native, isa, bits, k, n, t, v1, m, dtype, bias, lora, seed):
    from lightllm.ops import gptq as ops_gptq

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = (torch.randn(n, generator=gen) / 4).to(dtype if bias == "x" else torch.float16) if bias else None
    a = s = lb = None
    if lora:
        r = 1 + seed % 5
        lb = torch.randn(n, r, generator=gen).to(dtype)
        if lora == "a":
            a = torch.randn(r, k, generator=gen) / 8
        else:
            s = torch.randn(m, r, generator=gen)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], b, a, s, lb, 0.5, bits, v1)
    out = native.gptq_matmul(x, *args, isa=isa)
    ref = ops_gptq.gptq_matmul_reference(x, *args)
    w = ops_gptq.gptq_dequantize_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, v1, torch.float64)
    exact = x.double() @ w.t()
    if b is not None:
        exact += b.double()
    if lora:
        exact += 0.5 * ((x.double() @ a.double().t()) if s is None else s.double()) @ lb.double().t()
    err_ref = (ref.double() - exact).abs().max().item()
    err_out = (out.double() - exact).abs().max().item()
    bar = max(2 * err_ref, 4 * torch.finfo(dtype).eps * exact.abs().max().item())
    assert out.dtype == dtype and out.shape == (m, n)
    assert err_out <= bar, (isa, bits, k, n, v1, m, dtype, bias, lora, err_out, err_ref)


@pytest.mark.parametrize("isa", CPP_ISAS)
@pytest.mark.parametrize("bits", BITS)
def test_cpp_gemv_matches_reference(isa, bits):
    """Every group size x layout x shape, with the zero format, symmetry, scales' dtype, M, dtype, bias
    and LoRA epilogue rotated over the cases (each value of each at least once per bit width and ISA)."""
    native = _cpp()
    if isa != "scalar" and CPP_ISAS.index(isa) < CPP_ISAS.index(native.gptq_cpu_isa()):
        pytest.skip(f"this CPU has no {isa}")
    case = 0
    for k, n in CPP_SHAPES[bits]:
        for group_size in [32, 64, 128, -1, 40]:
            for layout in ["seq", "sorted", "scattered"]:
                v1, sym = case % 2 == 0, case % 3 == 0
                t = _random_gptq(k, n, bits, group_size, layout, sym, v1, seed=case)
                t["scales"] = t["scales"].to(DTYPES[(case // 2) % 3])  # QuantLinear's scales follow .to()
                for j in range(2):
                    i = 2 * case + j
                    _check_cpp_case(native, isa, bits, k, n, t, v1, m=CPP_M[i % len(CPP_M)], dtype=DTYPES[i % 3],
                                    bias=[None, "x", "half"][(i // 3) % 3], lora=[None, "a", "s"][(i // 2) % 3],
                                    seed=i)
                case += 1


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("case", _grid(seed=5, count=2), ids=str)
def test_cpp_backend_matches_reference_through_quant_linear(backend, case):
    if backend not in lightllm.available_backends():
        pytest.skip("no native build")
    bits, group_size, sym, act_order, m, dtype = case
    check_backend(backend, bits, group_size, sym, act_order, m, dtype, "cpu")
    check_backend(backend, bits, group_size, sym, act_order, [17, 257][bits % 2], torch.bfloat16, "cpu")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_cpp_dequantize_is_the_reference_bit_for_bit(bits, act_order, dtype):
    if "cpp" not in lightllm.available_backends():
        pytest.skip("no native build")
    check_triton_dequantize(bits, act_order, dtype, "cpu", backend="cpp")


def test_cpp_gemv_is_the_default_on_the_cpu_and_takes_any_strides():
    native = _cpp()
    assert lightllm.backends.default_backend("gptq_matmul", "cpu") == "cpp"
    q = QuantLinear.from_linear(make_linear(64, 48), 4, 32)
    x = torch.randn(64, 3).t()  # non-contiguous
    qweight = torch.stack([q.qweight, q.qweight], dim=2)[:, :, 0]  # non-contiguous, same values
    assert not x.is_contiguous() and not qweight.is_contiguous()
    y = native.gptq_matmul(x, qweight, q.qzeros, q.scales, q.g_idx, q.bias, None, None, None, 0.0, 4, True)
    with lightllm.use_backend("torch"):
        torch.testing.assert_close(y, q(x.contiguous()), rtol=1e-5, atol=1e-5)
    empty = native.gptq_matmul(x[:0], q.qweight, q.qzeros, q.scales, q.g_idx, None, None, None, None, 0.0, 4, True)
    assert empty.shape == (0, 48)


def test_cpp_gptq_kernels_check_their_arguments():
    native = _cpp()
    q = QuantLinear.from_linear(make_linear(64, 32), 4, 32)
    w = (q.qweight, q.qzeros, q.scales, q.g_idx)
    x = torch.randn(2, 64)

    def mm(x=x, qweight=q.qweight, qzeros=q.qzeros, scales=q.scales, g_idx=q.g_idx, bias=None, a=None, s=None,
           b=None, bits=4, **kw):
        return native.gptq_matmul(x, qweight, qzeros, scales, g_idx, bias, a, s, b, 0.5, bits, True, **kw)

    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8, got 5"):
        mm(bits=5)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8, got 5"):
        native.gptq_dequantize(*w, 5, True, torch.float16)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got Long"):
        mm(x=x.long())
    with pytest.raises(TypeError, match="qweight, qzeros and g_idx must be int32, got Long"):
        mm(qweight=q.qweight.long())
    with pytest.raises(TypeError, match="scales must be float32, float16 or bfloat16, got Int"):
        mm(scales=q.scales.int())
    with pytest.raises(TypeError, match="dtype must be float32, float16, bfloat16 or float64, got Long"):
        native.gptq_dequantize(*w, 4, True, torch.int64)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] with K = 64 \(g_idx's length\), got \[2, 65\]"):
        mm(x=torch.randn(2, 65))
    with pytest.raises(ValueError, match=r"qweight \[7, 32\] does not hold K = 64"):
        mm(qweight=q.qweight[:7])
    with pytest.raises(ValueError, match="do not match N = 32"):
        mm(qzeros=q.qzeros[:, :3])
    with pytest.raises(ValueError, match=r"g_idx\[5\] = 2 names no group \(scales and qzeros hold 2\)"):
        g = q.g_idx.clone()
        g[5] = 2
        mm(g_idx=g)
    with pytest.raises(ValueError, match=r"g_idx\[0\] = -1 names no group"):
        native.gptq_dequantize(q.qweight, q.qzeros, q.scales, torch.full_like(q.g_idx, -1), 4, True, torch.float32)
    with pytest.raises(ValueError, match=r"bias must be \[32\], got \[31\]"):
        mm(bias=torch.zeros(31))
    with pytest.raises(ValueError, match="lora_b goes with lora_a or lora_s"):
        mm(a=torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"lora_a must be \[r, K\] = \[3, 64\], got \[3, 63\]"):
        mm(a=torch.zeros(3, 63), b=torch.zeros(32, 3))
    with pytest.raises(ValueError, match=r"lora_s must be \[M, r\] = \[2, 3\], got \[1, 3\]"):
        mm(s=torch.zeros(1, 3), b=torch.zeros(32, 3))
    with pytest.raises(ValueError, match="isa must be 'auto', 'avx512bf16', 'avx512', 'avx2' or 'scalar', got 'sse'"):
        mm(isa="sse")
    with pytest.raises(ValueError, match="lightllm._C takes CPU tensors, got one on meta"):
        mm(x=x.to("meta"))
