"""The split reductions' counters (kernels/_common.py, csrc/bindings_cuda.cpp): a launch that fails
part-way must not poison the next, and CUDA graphs own their counters, so graphs captured one after
another replay correctly at the same time on different streams, however the cache grows later."""

import pytest
import torch

import lightllm
from lightllm import backends
from lightllm.nn import QuantLinear
from lightllm.ops import gptq as ops_gptq
from lightllm.ops import lora as ops_lora

from conftest import cpu_backends


def _lora_case(m, k, n, r, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    bias = (torch.randn(n, generator=gen) / 4).to(dtype)
    a = torch.randn(r, k, generator=gen) / k ** 0.5
    b = torch.randn(n, r, generator=gen)
    return [t.to(device) for t in (x, w, bias, a, b)]


def _gptq_layer(k, n, device="cpu", seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(torch.nn.Linear(k, n), 4, 32).to(device)


def _gptq_args(q):
    return q.qweight, q.qzeros, q.scales, q.g_idx, q.bias


# ---- CPU, Triton interpreter: a launch that raises after some programs counted in ---------------

def _split_launches():
    """(name, launch, reference) for each Triton kernel with a split reduction; every case has at
    least 4 slices per tile, so a launch stopped after 2 programs leaves tile 0 part-way."""
    from lightllm.kernels import adapter as k_adapter
    from lightllm.kernels import gptq as k_gptq
    from lightllm.kernels import lora as k_lora

    x, w, bias, a, b = _lora_case(3, 320, 70, 5, torch.float32, seed=1)
    xs = torch.randn(20, 320, generator=torch.Generator().manual_seed(2))
    q = _gptq_layer(256, 64, seed=3)
    xq = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    z, res = torch.randn(3, 88, generator=gen), torch.randn(3, 70, generator=gen)
    wd, bd = torch.randn(50, 88, generator=gen) / 88 ** 0.5, torch.randn(50, generator=gen) / 4
    wu, bu = torch.randn(70, 50, generator=gen) / 50 ** 0.5, torch.randn(70, generator=gen) / 4
    scale = torch.tensor([0.75])
    tanh = k_adapter.ACTIVATIONS["tanh"]

    def adapter_reference():
        hidden = torch.tanh(z.double() @ wd.double().t() + bd.double())
        return res.double() + 0.75 * (hidden @ wu.double().t() + bu.double())

    return [
        ("lora_decode", lambda: k_lora.lora_decode(x, w, bias, a, b, 0.5)[0],
         lambda: ops_lora.lora_linear_reference(x, w, bias, a, b, 0.5)[0]),
        ("skinny_matmul", lambda: k_lora.skinny_matmul(xs, a), lambda: xs.double() @ a.double().t()),
        ("gptq_matmul", lambda: k_gptq.gptq_matmul(xq, *_gptq_args(q), 4, True, split_k=4),
         lambda: ops_gptq.gptq_matmul_reference(xq, *_gptq_args(q), None, None, None, 0.0, 4, True)),
        ("adapter_decode", lambda: k_adapter.adapter_decode(z, res, wd, bd, wu, bu, scale, tanh)[0],
         adapter_reference),
    ]


@pytest.mark.parametrize("case", range(4))
def test_a_launch_aborted_mid_kernel_does_not_poison_the_next(case, monkeypatch):
    if "triton" not in cpu_backends():
        pytest.skip("triton cannot run here (no TRITON_INTERPRET on a CPU-only machine)")
    from triton.runtime import interpreter

    name, launch, reference = _split_launches()[case]
    expected = launch()
    ref = reference().double()
    assert (expected.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), name

    real_atomic = interpreter.InterpreterBuilder.create_atomic_rmw
    arrivals = []

    def fault_at_the_third_arrival(self, *args, **kwargs):
        arrivals.append(1)
        if len(arrivals) == 3:  # two programs of the first tile have counted in
            raise RuntimeError("injected fault in the third program")
        return real_atomic(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", fault_at_the_third_arrival)
    with pytest.raises(Exception, match="injected fault"):
        launch()
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", real_atomic)

    again = launch()
    assert torch.equal(again, expected), f"{name}: the launch after an aborted one differs"


# ---- the capture branch of the Python helper -----------------------------------------------------

def test_capture_asks_the_current_stream_of_a_cuda_device(monkeypatch):
    from lightllm.kernels import _common

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _common._capturing(torch.device("cuda", 0))
    assert not _common._capturing(torch.device("cpu"))  # a CPU tensor has no stream (and starts no CUDA)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _common._capturing(torch.device("cuda", 0))


def test_each_launch_under_capture_gets_its_own_zeroed_buffer(monkeypatch):
    if "triton" not in cpu_backends():
        pytest.skip("triton cannot run here (no TRITON_INTERPRET on a CPU-only machine)")
    from lightllm.kernels import _common
    from lightllm.kernels import lora as k_lora

    device = torch.device("cpu")
    x, w, bias, a, b = _lora_case(3, 320, 70, 5, torch.float32, seed=6)
    expected = k_lora.lora_decode(x, w, bias, a, b, 0.5)[0]
    cached = _common.split_counters(device, 1)
    cached_size = cached.numel()

    given = []
    real = _common.split_counters

    def spy(device, count):
        buffer = real(device, count)
        assert int(buffer.abs().sum()) == 0, "a split launch must start from zeroed counters"
        given.append(buffer)
        return buffer

    monkeypatch.setattr(_common, "_capturing", lambda device: True)
    monkeypatch.setattr(k_lora, "split_counters", spy)
    # a count beyond the cached buffer's: under capture it must not grow (replace) the cache
    big = _common.split_counters(device, cached_size + 1)
    outs = [k_lora.lora_decode(x, w, bias, a, b, 0.5)[0] for _ in range(2)]
    assert len(given) == 2
    for buffer in (*given, big):
        assert buffer.data_ptr() != cached.data_ptr(), "a captured launch used the cached buffer"
    assert given[0].data_ptr() != given[1].data_ptr()
    assert all(torch.equal(out, expected) for out in outs)
    monkeypatch.undo()
    assert _common.split_counters(device, 1) is cached and cached.numel() == cached_size


# ---- GPU: graphs captured on the shared capture stream, replayed at the same time -------------------

def _gemvs(backend):
    """Two one-launch GEMVs of ``backend``: the LoRA decode and the GPTQ GEMV, each a function of
    its (static) inputs."""
    x, w, bias, a, b = _lora_case(4, 4096, 1056, 16, torch.float16, device="cuda", seed=7)
    q = _gptq_layer(4096, 2048, device="cuda", seed=8)
    xq = torch.randn(2, 4096, device="cuda", dtype=torch.float16)

    def lora():
        with lightllm.use_backend(backend):
            return torch.ops.lightllm.lora_linear(x, w, bias, a, b, 0.5)[0]

    def gptq():
        with lightllm.use_backend(backend):
            return torch.ops.lightllm.gptq_matmul(xq, *_gptq_args(q), None, None, None, 0.0, 4, True)

    def grow():  # the LoRA GEMV with more column tiles (1172) than the first buffer's 1024 counters
        xl, wl, bl, al, b2 = _lora_case(4, 64, 300_000, 16, torch.float16, device="cuda", seed=9)
        with lightllm.use_backend(backend):
            torch.ops.lightllm.lora_linear(xl, wl, bl, al, b2, 0.5)

    return (lora, gptq), grow


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_graphs_own_their_counters_and_replay_at_the_same_time(backend):
    for op in (ops_lora.LINEAR, ops_gptq.MATMUL):
        if not backends.has_kernel(op, backend, "cuda"):
            pytest.skip(f"no {backend} kernel for {op} here: {backends.why_unavailable(backend)}")
    gemvs, grow = _gemvs(backend)
    eager = [fn() for fn in gemvs]  # also compiles the Triton kernels before capture
    torch.cuda.synchronize()
    graphs, outs = [], []
    for fn in gemvs:  # one after another on torch.cuda.graph's shared capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(fn())
        graphs.append(graph)
    capture_stream = torch.cuda.graph.default_capture_stream
    # grow (replace) the cached buffers of the capture stream and of the current stream
    for stream in (capture_stream, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            grow()
    torch.cuda.synchronize()

    streams = [torch.cuda.Stream() for _ in graphs]
    results = [[] for _ in graphs]
    for _ in range(50):  # replays of both graphs overlap, each on its own stream
        for graph, out, stream, seen in zip(graphs, outs, streams, results):
            with torch.cuda.stream(stream):
                graph.replay()
                seen.append(out.clone())
    torch.cuda.synchronize()
    for expected, seen in zip(eager, results):
        bad = [i for i, got in enumerate(seen) if not torch.equal(got, expected)]
        assert not bad, f"{backend}: replays {bad[:5]} differ from the eager result"
    # and eagerly again, from the same inputs, after all the replays
    assert all(torch.equal(fn(), expected) for fn, expected in zip(gemvs, eager))
