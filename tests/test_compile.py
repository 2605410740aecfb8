"""torch.compile with its default backend (inductor; C++ code on the CPU): every op, every layer and
the tuning methods' forward and backward compile into one graph (``fullgraph=True`` makes any graph
break an error) and give eager's results, and the compiled graph runs the kernels of the backend
chosen (custom ops dispatch at run time, inside the compiled code: the dispatch record proves it).
The 8-bit optimizers' ``step`` compiles too, and a compiled QLoRA training step tracks eager.

Inductor compiles slowly on 2 cores: few graphs, shared sizes, ``dynamic=False``, a reset per test.
"""

import copy

import pytest
import torch

import lightllm
from lightllm import backends
from lightllm import functional as F
from lightllm.nn import Linear8bitLt, LinearFP4, LinearNF4, QuantLinear, StableEmbedding
from lightllm.ops import fourbit as ops_fourbit
from lightllm.optim import AdamW8bit
from lightllm.quantization.bnb import int8 as bnb_int8
from lightllm.quantization.bnb import nf4 as bnb_nf4
from lightllm.quantization.gptq import format as gptq_format

from conftest import cpu_backends


def backends_for(*ops: str) -> list[str]:
    """The CPU backends with their own kernel for every op named."""
    return [b for b in cpu_backends() if all(backends.has_kernel(op, b, "cpu") for op in ops)]


def compiled(fn):
    torch._dynamo.reset()  # a fresh cache: each test's graphs are compiled here, not taken from another test
    return torch.compile(fn, fullgraph=True, dynamic=False)


def ops_ran(calls) -> set[str]:
    return {call.op for call in calls}


def assert_same(eager, got):
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(eager) == len(got)
    for e, g in zip(eager, got):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e), f"compiled differs from eager by {(g.double() - e.double()).abs().max().item()}"


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def eager_and_compiled(backend, fn, *args):
    """(eager result, compiled result, ops the compiled call dispatched)."""
    with lightllm.use_backend(backend):
        eager = fn(*args)
        with backends.record_dispatches() as calls:
            got = compiled(fn)(*args)
    return eager, got, calls


def grads_of(fn, leaves, seed):
    """(output, gradients of every leaf) of ``fn(*leaves)`` for a fixed random output gradient: the
    backward then needs no rounding of a loss that inductor could fuse differently."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    y.backward(randn(*y.shape, seed=seed, dtype=y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# ---- the ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_for("quantize_blockwise", "dequantize_blockwise"))
def test_blockwise_ops(backend):
    code = F.create_dynamic_map(True)
    x = randn(7, 83, seed=1) * 3

    def roundtrip(x):
        codes, absmax = F.quantize_blockwise(x, code, 64)
        return codes, absmax, F.dequantize_blockwise(codes, absmax, code, 64, torch.float16)

    eager, got, calls = eager_and_compiled(backend, roundtrip, x)
    assert_same(eager, got)
    assert ops_ran(calls) == {"quantize_blockwise", "dequantize_blockwise"}
    # the map's check (a host-side branch in eager mode) is an assertion inside the compiled graph
    with pytest.raises(RuntimeError, match="code must be sorted"):
        compiled(lambda x: F.quantize_blockwise(x, code.flip(0), 64))(x)


@pytest.mark.parametrize("backend", backends_for("quantize_4bit"))
def test_quantize_4bit(backend):
    w = randn(37, 83, seed=2)  # 3071 values: an odd count, a short last block

    def quantize(w):
        packed, state = bnb_nf4.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return packed, state.absmax, state.offset, state.state2.absmax

    eager, got, calls = eager_and_compiled(backend, quantize, w)
    assert_same(eager, got)
    assert ops_ran(calls) == {"quantize_4bit", "quantize_blockwise"}


@pytest.mark.parametrize("backend", backends_for("dequantize_4bit", "matmul_4bit", "dequantize_blockwise"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_dequantize_and_matmul(backend, quant_type):
    w, x, bias = randn(37, 83, seed=3), randn(7, 83, seed=4), randn(37, seed=5)
    packed, state = bnb_nf4.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    nested = ops_fourbit.nested_args(state)

    def fn(x, packed):
        y = torch.ops.lightllm.matmul_4bit(x, packed.view(-1), state.absmax, 64, quant_type, 37, bias, *nested)
        return y, bnb_nf4.dequantize_4bit(packed, state)

    eager, got, calls = eager_and_compiled(backend, fn, x, packed)
    assert_same(eager, got)
    assert {"matmul_4bit", "dequantize_4bit"} <= ops_ran(calls)


def act_order_quant_linear(k=72, n=40, bits=4, group_size=32, seed=6):
    """A QuantLinear whose g_idx is not monotone (act-order): its forward gathers x's columns."""
    torch.manual_seed(seed)
    weight = torch.randn(n, k)
    rtn = gptq_format.quantize_rtn(weight, bits, group_size, sym=False, zero_min=1)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    layer = QuantLinear.from_quantized(rtn["q"][perm], rtn["zeros"], rtn["scales"], rtn["g_idx"][perm], bits,
                                       group_size, bias=torch.randn(n))
    assert layer._perm is not None
    return layer


@pytest.mark.handover("lora_shrink")  # gptq_lora_linear's S = x A^T is the LoRA op's (no C++ kernel of its own)
@pytest.mark.parametrize("backend", backends_for("gptq_dequantize", "gptq_matmul"))
def test_gptq_ops(backend):
    layer = QuantLinear.from_linear(torch.nn.Linear(72, 40), 4, 32)  # K = 72: the last group is short
    b = layer._buffers
    x, a, lb = randn(7, 72, seed=7), randn(3, 72, seed=8), randn(40, 3, seed=9)

    def fn(x, a, lb):
        args = (b["qweight"], b["qzeros"], b["scales"], b["g_idx"])
        w = torch.ops.lightllm.gptq_dequantize(*args, 4, True, torch.float32)
        y = torch.ops.lightllm.gptq_matmul(x, *args, b["bias"], a, None, lb, 0.5, 4, True)
        y2, s = torch.ops.lightllm.gptq_lora_linear(x, *args, b["bias"], a, lb, 0.5, 4, True)
        return w, y, y2, s

    eager, got, calls = eager_and_compiled(backend, fn, x, a, lb)
    assert_same(eager, got)
    assert {"gptq_dequantize", "gptq_matmul"} <= ops_ran(calls)


@pytest.mark.parametrize("backend", backends_for("int8_linear"))
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_int8_linear(backend, threshold):
    cb, scb, _ = bnb_int8.int8_vectorwise_quant(randn(37, 83, seed=10).half())
    x, bias = randn(7, 83, seed=11), randn(37, seed=12)
    x[:, 5] *= 8  # an outlier column above the threshold

    eager, got, calls = eager_and_compiled(
        backend, lambda x: torch.ops.lightllm.int8_linear(x, cb, scb, bias, threshold), x)
    assert_same(eager, got)
    assert ops_ran(calls) == {"int8_linear"}


@pytest.mark.parametrize("backend", backends_for("lora_linear", "lora_shrink", "lora_matmul", "lora_weight_grad"))
def test_lora_linear_forward_and_backward(backend):
    w, bias = randn(37, 83, seed=13) / 9, randn(37, seed=14)
    x, a, b = randn(3, 7, 83, seed=15), randn(3, 83, seed=16), randn(37, 3, seed=17)  # 21 tokens, rank 3

    def layer(x, a, b):
        return F.lora_linear(x, w, bias, a, b, 0.5)

    with lightllm.use_backend(backend):
        eager = grads_of(layer, [x, a, b], seed=18)
        with backends.record_dispatches() as calls:
            got = grads_of(compiled(layer), [x, a, b], seed=18)
    assert_same(eager, got)
    assert ops_ran(calls) == {"lora_linear", "lora_shrink", "lora_matmul", "lora_weight_grad"}


@pytest.mark.parametrize("backend", backends_for("bottleneck_adapter", "bottleneck_adapter_backward"))
def test_bottleneck_adapter_forward_and_backward(backend):
    z, res = randn(3, 7, 83, seed=19), randn(3, 7, 37, seed=20)
    wd, bd, wu, bu = randn(5, 83, seed=21) / 9, randn(5, seed=22), randn(37, 5, seed=23) / 3, randn(37, seed=24)
    scale = torch.tensor([0.7])  # learned scaling: a tensor with a gradient

    def adapter(z, res, wd, bd, wu, bu, scale):
        return F.bottleneck_adapter(z, res, wd, bd, wu, bu, scale, "gelu")

    leaves = [z, res, wd, bd, wu, bu, scale]
    with lightllm.use_backend(backend):
        eager = grads_of(adapter, leaves, seed=25)
        with backends.record_dispatches() as calls:
            got = grads_of(compiled(adapter), leaves, seed=25)
    assert_same(eager, got)
    assert ops_ran(calls) == {"bottleneck_adapter", "bottleneck_adapter_backward"}


# ---- the layers -------------------------------------------------------------------------------

def assert_ran(expected_ops, calls):
    """Each entry of ``expected_ops`` ran: an op name, or a tuple of names of which one ran."""
    ran = ops_ran(calls)
    for entry in expected_ops:
        names = entry if isinstance(entry, tuple) else (entry,)
        assert ran & set(names), f"none of {names} ran (ran: {sorted(ran)})"


def check_layer(backend, layer, x, expected_ops, train=True):
    """The layer compiled against eager: the output without autograd (bit for bit), then (``train``)
    output and gradients of x and of every trainable parameter."""
    with lightllm.use_backend(backend):
        with torch.no_grad():
            eager = layer(x)
            with backends.record_dispatches() as calls:
                got = compiled(layer)(x)
        assert_same(eager, got)
        if not train:
            assert_ran(expected_ops, calls)
            return
        params = [p for p in layer.parameters() if p.requires_grad]
        results = []
        for fn in (layer, compiled(layer)):
            xi = x.detach().clone().requires_grad_(x.is_floating_point())
            with backends.record_dispatches() as training_calls:
                y = fn(xi)
                y.backward(randn(*y.shape, seed=26, dtype=y.dtype))
            if fn is not layer:  # the compiled one
                calls += training_calls
            results.append([y.detach()] + ([xi.grad] if xi.grad is not None else []) + [p.grad.clone() for p in params])
            for p in params:
                p.grad = None
    # gradients that autograd formulas compute with torch ops (a bias's sum over tokens) are
    # inductor's fused reductions: float tolerance; the custom ops' own outputs are eager's bits
    for e, c in zip(*results):
        torch.testing.assert_close(c, e)
    assert_ran(expected_ops, calls)


@pytest.mark.parametrize("backend", backends_for("gptq_matmul", "gptq_dequantize"))
def test_quant_linear(backend):
    # act-order (the forward gathers x's columns), 15 tokens, bias, gradient to the input
    check_layer(backend, act_order_quant_linear(), randn(3, 5, 72, seed=27), {"gptq_matmul"})


def test_one_compiled_graph_follows_the_backend_choice():
    """The kernel is chosen when the op runs: one compiled graph runs whichever backend is chosen."""
    layer = act_order_quant_linear()
    x = randn(3, 72, seed=35)
    fn = compiled(layer)
    for backend in backends_for("gptq_matmul"):
        with lightllm.use_backend(backend), torch.no_grad(), backends.record_dispatches() as calls:
            got, eager = fn(x), layer(x)
        assert_same(eager, got)
        assert {(call.op, call.ran) for call in calls} == {("gptq_matmul", backend)}


@pytest.mark.parametrize("backend", backends_for("matmul_4bit", "dequantize_4bit"))
@pytest.mark.parametrize("cls", [LinearNF4, LinearFP4])
def test_linear4bit(backend, cls):
    dense = torch.nn.Linear(83, 37)
    layer = cls(83, 37, compress_statistics=cls is LinearNF4)  # double quantization on NF4
    layer.load_state_dict(dense.state_dict())
    check_layer(backend, layer, randn(3, 5, 83, seed=28), {"matmul_4bit"})


def test_linear4bit_warning_is_not_a_graph_break(caplog):
    """float16 input with compute_dtype float32 logs a warning in eager mode; traced, it must not
    (a logger call in a traced forward is a graph break)."""
    layer = LinearNF4(83, 37, compute_dtype=torch.float32)
    layer.load_state_dict(torch.nn.Linear(83, 37).state_dict())
    x = randn(5, 83, seed=36, dtype=torch.float16)
    with torch.no_grad():
        got = compiled(layer)(x)
        assert "compute_dtype float32" not in caplog.text
        assert_same(layer(x), got)
    assert "compute_dtype float32" in caplog.text


@pytest.mark.parametrize("backend", backends_for("int8_linear"))
def test_linear8bitlt_inference(backend):
    dense = torch.nn.Linear(83, 37)
    layer = Linear8bitLt(83, 37, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    x = randn(3, 5, 83, seed=29)
    x[..., 3] *= 10  # outliers
    check_layer(backend, layer, x, {"int8_linear"}, train=False)


@pytest.mark.parametrize("backend", backends_for("int8_linear"))
def test_linear8bitlt_trainable_weight(backend):
    """has_fp16_weights=True quantizes a float16 copy of the float32 weight in every forward. Inductor
    does not round intermediate float16 casts inside a fused kernel unless asked to
    (``emulate_precision_casts``): then the compiled layer is eager's bit for bit; by default a code
    can move by one step (the README says so)."""
    import torch._inductor.config as inductor_config

    dense = torch.nn.Linear(83, 37)
    layer = Linear8bitLt(83, 37, has_fp16_weights=True)
    layer.load_state_dict(dense.state_dict())
    x = randn(3, 5, 83, seed=30)
    with inductor_config.patch(emulate_precision_casts=True):
        check_layer(backend, layer, x, {"int8_linear"})
    with lightllm.use_backend(backend), torch.no_grad():
        eager, got = layer(x), compiled(layer)(x)
    # one code step of a row is absmax / 127 of the weight; summed over the inputs of one output
    step = layer.weight.detach().abs().amax(dim=1) / 127 * x.abs().sum(-1, keepdim=True)
    assert ((got - eager).abs() <= step).all()


def test_stable_embedding():
    layer = StableEmbedding(50, 24)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(31))
    results = []
    for fn in (layer, compiled(layer)):
        y = fn(ids)
        y.backward(randn(*y.shape, seed=32))
        results.append((y.detach(), layer.weight.grad.clone()))
        layer.weight.grad = None
    # no lightllm op here: the layer norm is torch's, which inductor fuses (float tolerance)
    for e, c in zip(*results):
        torch.testing.assert_close(c, e)


# ---- LoRA on every base layer (the adapters train, the base is frozen) -----------------------

class Block(torch.nn.Module):
    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.q_proj, self.v_proj = base, torch.nn.Linear(40, 24)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def lora_block(base):
    from lightllm.tuning import LoraConfig, get_peft_model

    return get_peft_model(Block(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).model


def _bases():
    dense = torch.nn.Linear(72, 40)
    nf4, int8 = LinearNF4(72, 40), Linear8bitLt(72, 40, has_fp16_weights=False)
    nf4.load_state_dict(dense.state_dict())
    int8.load_state_dict(dense.state_dict())
    # the base, and the ops its LoRA layer dispatches (gptq_lora_linear runs lora_shrink and
    # gptq_matmul's kernels; its backward gptq_dequantize)
    return {"dense": (torch.nn.Linear(72, 40), {"lora_linear"}),
            "quant_linear": (act_order_quant_linear(), {"gptq_matmul", "lora_shrink", "gptq_dequantize"}),
            # the 4-bit backward dequantizes; int8: the plain int8 layer or its fused LoRA op
            "nf4": (nf4, {"dequantize_4bit"}),
            "int8": (int8, {("int8_linear", "int8_lora_linear")})}


# C++ kernels exist for the quantized bases' ops; LoRA's own ops (the dense v_proj, S = x A^T) run
# their default there
LORA_CASES = [(base, backend) for base in ("dense", "quant_linear", "nf4", "int8")
              for backend in ("torch", "cpp") if backend in cpu_backends() and (backend != "cpp" or base != "dense")]


# LoRA's ops (the dense v_proj's, and fused LoRA ops of a quantized base without a C++ kernel) run
# their default under the cpp backend
@pytest.mark.handover("lora_linear", "lora_shrink", "lora_matmul", "lora_weight_grad", "fourbit_lora_linear",
                      "int8_lora_linear")
@pytest.mark.parametrize("base,backend", LORA_CASES)
def test_lora_on_each_base(base, backend):
    torch.manual_seed(33)
    layer, expected = _bases()[base]
    check_layer(backend, lora_block(layer), randn(3, 5, 72, seed=34), expected)


# ---- whole models: adapters, prefix tuning, a QLoRA training step with the 8-bit optimizer -----

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def perturb_trainable(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def check_model_step(wrapped, expected_ops):
    """Loss and gradients of one training step, compiled against eager."""
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    results = []
    for model in (wrapped, compiled(wrapped)):
        with backends.record_dispatches() as calls:
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params], ops_ran(calls)))
        wrapped.zero_grad()
    (loss_e, grads_e, _), (loss_c, grads_c, ops) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)  # inductor fuses the model's float math
    for e, c in zip(grads_e, grads_c):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    assert expected_ops <= ops


def test_bottleneck_adapters_on_a_model():
    from lightllm.tuning import AdapterConfig, get_peft_model

    # Pfeiffer: after the MLP, reading the residual stream that the norm in front captured
    wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset("pfeiffer"))
    perturb_trainable(wrapped)
    check_model_step(wrapped, {"bottleneck_adapter", "bottleneck_adapter_backward"})


def test_prefix_tuning_on_a_model():
    from lightllm.tuning import PrefixTuningConfig, get_peft_model

    wrapped = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))
    perturb_trainable(wrapped)
    check_model_step(wrapped, set())


@pytest.mark.parametrize("backend", backends_for("optimizer_step"))
def test_optimizer_step_compiles(backend):
    """AdamW8bit.step compiled as torch compiles its own optimizers' steps: one graph (state
    creation included), the parameters and the 8-bit state equal eager's after each step."""
    torch.manual_seed(35)
    model = torch.nn.Sequential(torch.nn.Linear(16, 71), torch.nn.ReLU(), torch.nn.Linear(71, 7))
    twin = copy.deepcopy(model)
    x, target = randn(9, 16, seed=36), randn(9, 7, seed=37)
    lr = torch.tensor(1e-2)  # a tensor: changed in place, the compiled step reads it, no recompile
    opt_e = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)  # 8-bit and 32-bit state both
    opt_c = AdamW8bit(twin.parameters(), lr=lr, min_8bit_size=1024)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(opt_c.step, fullgraph=True, dynamic=False)
    with lightllm.use_backend(backend):
        for i in range(3):
            if i:
                lr.mul_(0.5)
                opt_e.param_groups[0]["lr"] *= 0.5
            for m in (model, twin):
                torch.nn.functional.mse_loss(m(x), target).backward()
            opt_e.step()
            with backends.record_dispatches() as calls:
                step()
            assert ops_ran(calls) == {"optimizer_step"}
            opt_e.zero_grad()
            opt_c.zero_grad()
            for p, q in zip(model.parameters(), twin.parameters()):
                assert torch.equal(p, q)
                for key, value in opt_e.state[p].items():
                    assert torch.equal(value, opt_c.state[q][key]), key
    # two graphs: the first step (creating the state) and every later one
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_qlora_training_step():
    """QLoRA on a GPTQ-quantized model: the forward compiled as one graph (and its backward by
    AOTAutograd), AdamW8bit's step compiled as another; the losses track eager's over a few steps."""
    from lightllm.quantization import QuantConfig, quantize_model
    from lightllm.tuning import LoraConfig, get_peft_model

    runs = []
    for compile_it in (False, True):
        model = tiny_llama()
        quantize_model(model, IDS, QuantConfig(bits=4, group_size=16, method="rtn"), progress=False)
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        lora.train()
        opt = AdamW8bit([p for p in lora.parameters() if p.requires_grad], lr=5e-3, min_8bit_size=64)

        # the model's forward compiled: AOTAutograd compiles its backward too (a compiled function
        # cannot call .backward() itself: Dynamo does not trace it)
        model, step = lora.model, opt.step
        if compile_it:
            model = compiled(lora.model)
            step = torch.compile(opt.step, fullgraph=True, dynamic=False)
        losses = []
        with backends.record_dispatches() as calls:
            for _ in range(3):
                loss = model(input_ids=IDS, labels=IDS).loss
                loss.backward()
                losses.append(loss.detach())
                step()
                opt.zero_grad()
        assert {"gptq_matmul", "lora_shrink", "gptq_dequantize", "optimizer_step"} <= ops_ran(calls)
        runs.append(torch.stack(losses))
    eager, got = runs
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)


# ---- CUDA graphs ------------------------------------------------------------------------------

@pytest.mark.gpu
def test_reduce_overhead_mode_on_a_gpu():
    """mode="reduce-overhead" (CUDA graphs) over QLoRA decode-sized calls: replays equal eager."""
    layer = lora_block(act_order_quant_linear())
    layer.v_proj.base_layer.half()  # the quantized q_proj gives float16: the dense layer after it too
    layer.cuda()
    torch._dynamo.reset()
    fn = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=False)
    with torch.no_grad():
        for seed in range(4):  # warm-up, recording, replays
            x = randn(1, 3, 72, seed=seed, dtype=torch.float16).cuda()
            eager = layer(x)
            torch.testing.assert_close(fn(x).clone(), eager, rtol=2e-3, atol=2e-3)
