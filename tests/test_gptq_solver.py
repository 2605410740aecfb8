"""The GPTQ solver: Hessians, the plain PyTorch loop against a literal unblocked GPTQ written here,
GPTQ against round-to-nearest, the fused Triton block kernel against the plain loop."""

import logging
import math

import pytest
import torch

from lightllm import backends
from lightllm.quantization import HessianAccumulator, gptq_solve, gptq_solve_reference, quantize_rtn


def correlated_inputs(tokens, k, seed):
    """Activations with a strongly non-isotropic covariance and a few large outlier features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ torch.randn(k, k, generator=g) / math.sqrt(k)
    x[:, :: max(1, k // 8)] *= 6
    return x + 0.3 * torch.randn(k, generator=g)


def dense(result_like) -> torch.Tensor:
    t = result_like
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (t["q"] - t["zeros"][g]).float()).t()


def output_error(x, w, wq) -> float:
    return float(((x @ (w - wq).t()) ** 2).mean())


def literal_gptq(w, h, bits, sym, damp=0.01):
    """GPTQ as the paper states it, one column at a time with no blocking, float64, one group per
    row (group size -1): quantize column i, then update every later column by the error times the
    row of the upper Cholesky factor of H^-1."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq = 2**bits - 1
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = ((hi - lo) / maxq).half().double()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, maxq)
        err = (w[:, i] - scale * (q[:, i] - zero)) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q


def test_hessian_accumulates_2xxt_over_unmasked_tokens():
    x = correlated_inputs(300, 24, 0).view(3, 100, 24)
    mask = torch.ones(3, 100, dtype=torch.long)
    mask[1, 60:] = 0  # padding
    acc = HessianAccumulator(24)
    acc.add(x[:1])
    acc.add(x[1:], mask[1:])
    kept = torch.cat([x[0], x[1, :60], x[2]]).double()
    torch.testing.assert_close(acc.hessian.double(), 2 * kept.t() @ kept / kept.shape[0], rtol=1e-5, atol=1e-5)
    assert acc.tokens == 260
    flat = HessianAccumulator(24)  # a model that flattens tokens ([B*T, K], as MoE blocks do)
    flat.add(x[1:].reshape(-1, 24), mask[1:])
    kept = torch.cat([x[1, :60], x[2]]).double()
    torch.testing.assert_close(flat.hessian.double(), 2 * kept.t() @ kept / kept.shape[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dimension 7, expected 24"):
        acc.add(torch.randn(2, 7))


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (2, True)])
def test_blocked_solver_matches_the_literal_algorithm(bits, sym):
    # K = 320: three blocks, the last one short. One group per row, so grids do not depend on when
    # a group is reached and the blocked (lazy) solver must equal the literal one up to rounding.
    w = torch.randn(24, 320, generator=torch.Generator().manual_seed(bits))
    x = correlated_inputs(1024, 320, bits)
    h = 2 * x.t() @ x / x.shape[0]
    r = gptq_solve_reference(w, h, bits, group_size=-1, sym=sym)
    q = literal_gptq(w, h, bits, sym)
    same = (r.q.t().double() == q).double().mean()
    assert same > 0.995, f"only {same:.4f} of the codes agree with the literal algorithm"


@pytest.mark.parametrize("bits,group_size,act_order,static_groups,sym", [
    (4, 128, False, False, True), (4, 32, True, False, True), (3, 64, True, True, False),
    (2, -1, False, False, True), (4, 48, False, False, False), (3, 256, True, False, True), (8, 128, False, False, True),
])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, group_size, act_order, static_groups, sym):
    k = 288  # not a multiple of 128 (short last block) nor of 48 / 64 / 256 (short last group)
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(7))
    x = correlated_inputs(2048, k, 3)
    h = 2 * x.t() @ x / x.shape[0]
    r = gptq_solve_reference(w, h, bits, group_size, sym=sym, act_order=act_order, static_groups=static_groups)
    rtn = quantize_rtn(w, bits, group_size, sym=sym)
    assert r.q.shape == (k, 40) and r.scales.shape == rtn["scales"].shape == r.zeros.shape
    assert int(r.q.min()) >= 0 and int(r.q.max()) < 2**bits
    size = k if group_size == -1 else group_size
    if act_order and not static_groups and group_size != -1:
        # g_idx follows the processing order: the i-th visited column belongs to group i // size
        order = torch.argsort(torch.diag(h), descending=True)
        assert torch.equal(r.g_idx[order].long(), torch.arange(k) // size)
    else:
        assert torch.equal(r.g_idx.long(), torch.arange(k) // size)
    e_gptq, e_rtn = output_error(x, w, r.dequantize()), output_error(x, w, dense(rtn))
    assert e_gptq < 0.8 * e_rtn, f"GPTQ output error {e_gptq:.4g} is not clearly below RTN's {e_rtn:.4g}"


def test_dead_inputs_get_zero_weights_and_damping_retries(caplog):
    w = torch.randn(16, 64)
    x = correlated_inputs(512, 64, 1)
    x[:, 5] = 0
    h = 2 * x.t() @ x / 512
    r = gptq_solve_reference(w, h, 4, 32)
    assert torch.all(r.dequantize()[:, 5] == 0)
    # An indefinite Hessian: Cholesky fails until the damping dominates; it is retried, logged.
    bad = torch.eye(64) + 2 * (torch.ones(64, 64) - torch.eye(64)) / 63 * 40
    with caplog.at_level(logging.WARNING, logger="lightllm"):
        r = gptq_solve_reference(w, bad, 4, 32)
    assert r.damp > 0.01 and "Cholesky failed" in caplog.text


def test_per_row_grid_is_taken_before_dead_columns_are_zeroed():
    # group size -1: the reference computes the row's grid from the original weights.
    w = torch.randn(8, 64)
    w[:, 3] = 10.0  # the largest weights sit in a dead input
    x = correlated_inputs(256, 64, 2)
    x[:, 3] = 0
    r = gptq_solve_reference(w, 2 * x.t() @ x / 256, 4, -1)
    assert torch.allclose(r.scales.float()[0], torch.full((8,), 20.0 / 15), rtol=1e-3)  # [-10, 10] / 15 levels
    assert torch.all(r.dequantize()[:, 3] == 0)


def test_fused_without_triton_says_so(monkeypatch):
    from lightllm.quantization.gptq import solver as gptq
    monkeypatch.setattr(gptq, "_triton_solver", lambda: None)
    with pytest.raises(RuntimeError, match="needs Triton"):
        gptq_solve(torch.randn(8, 32), torch.eye(32), 4, fused=True)


def test_the_solver_follows_the_backend_choice_like_every_op(monkeypatch):
    """The block solver is dispatched as op gptq_solve_block: the automatic choice runs the reference
    on the CPU, and on a GPU the kernel only once it is in GPU_VERIFIED; a backend chosen by name
    (use_backend) runs its kernel."""
    import lightllm
    from lightllm.quantization.gptq import solver as gptq

    ran = []

    def spy(name, impl):
        def fn(*args):
            ran.append(name)
            return impl.fn(*args)
        return backends.Implementation(fn, impl.devices)

    table = backends._REGISTRY[gptq.SOLVE_BLOCK]
    for name, impl in list(table.items()):
        monkeypatch.setitem(table, name, spy(name, impl))
    x = correlated_inputs(128, 64, 3)
    w, h = torch.randn(8, 64), 2 * x.t() @ x / 128
    automatic = gptq_solve(w, h, 4, 32)
    assert ran == ["torch"]  # one block of 64 columns, the reference
    if backends.triton_interpreted() and backends.why_unavailable("triton") is None:  # CPU tensors: the interpreter
        ran.clear()
        with lightllm.use_backend("triton"):
            chosen = gptq_solve(w, h, 4, 32)
        assert ran == ["triton"]
        assert (chosen.q == automatic.q).double().mean() > 0.99

    assert backends.default_backend(gptq.SOLVE_BLOCK, "cuda") == "torch"  # not verified on a card yet
    monkeypatch.setattr(backends, "why_unavailable", lambda backend: None)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_90")
    monkeypatch.setitem(backends.GPU_VERIFIED, (gptq.SOLVE_BLOCK, "triton", "sm_90"), {"card": "a test's"})
    assert backends.default_backend(gptq.SOLVE_BLOCK, "cuda") == "triton"


def test_bad_input():
    w, h = torch.randn(8, 32), torch.eye(32)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_solve(w, h, 5)
    with pytest.raises(ValueError, match=r"Hessian must be \[32, 32\]"):
        gptq_solve(w, torch.eye(16), 4)
    with pytest.raises(ValueError, match="group_size"):
        gptq_solve(w, h, 4, group_size=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_solve(w, h * float("nan"), 4)
    with pytest.raises(ValueError, match="damp_percent"):
        gptq_solve(w, h, 4, damp_percent=0)


needs_triton = pytest.mark.skipif(backends.why_unavailable("triton") is not None,
                                  reason=f"Triton unavailable: {backends.why_unavailable('triton')}")


@needs_triton
@pytest.mark.parametrize("n,k,bits,group_size,act_order,static_groups,sym", [
    (24, 160, 4, 32, True, False, True),   # short last block, act-order
    (19, 96, 3, -1, False, False, False),  # rows not a multiple of the tile
    (8, 136, 2, 64, True, True, True),
])
def test_fused_block_kernel_matches_the_plain_loop(n, k, bits, group_size, act_order, static_groups, sym):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(device)
    x = correlated_inputs(1024, k, n).to(device)
    h = 2 * x.t() @ x / x.shape[0]
    plain = gptq_solve(w, h, bits, group_size, sym, act_order, static_groups, fused=False)
    fused = gptq_solve(w, h, bits, group_size, sym, act_order, static_groups, fused=True)
    same = (plain.q == fused.q).double().mean()
    assert same > 0.995, f"only {same:.4f} of the codes agree"
    assert torch.equal(plain.g_idx, fused.g_idx)
    assert abs(fused.error - plain.error) <= 0.01 * plain.error
    assert abs(output_error(x, w, fused.dequantize()) - output_error(x, w, plain.dequantize())) <= \
        0.01 * output_error(x, w, plain.dequantize())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group_size,act_order", [(4096, 4096, 128, False), (11008, 4096, 128, True)])
def test_fused_solver_on_gpu_large(n, k, group_size, act_order):
    w = torch.randn(n, k, device="cuda") * 0.02
    x = correlated_inputs(4096, k, 0).cuda()
    h = 2 * x.t() @ x / x.shape[0]
    plain = gptq_solve(w, h, 4, group_size, True, act_order, fused=False)
    fused = gptq_solve(w, h, 4, group_size, True, act_order, fused=True)
    assert (plain.q == fused.q).double().mean() > 0.99
    assert abs(fused.error - plain.error) <= 0.01 * plain.error
