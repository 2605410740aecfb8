"""LoRA (and bottleneck adapters) on bitsandbytes-style bases: ``lightllm::fourbit_lora_linear`` (NF4 /
FP4, QLoRA) and ``lightllm::int8_lora_linear`` (LLM.int8), each backend against plain float64 PyTorch
on the dequantized weight, forward and the gradients of x, A, B (and bias); the LoRA layers on
Linear4bit / Linear8bitLt run those fused ops; and a few AdamW steps of QLoRA on the embedded model
track peft + the real bitsandbytes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_backends
from torch import nn

from lightllm import backends, tuning
from lightllm.nn import Linear4bit, Linear8bitLt, LinearFP4, LinearNF4
from lightllm.ops import fourbit as ops_fourbit
from lightllm.ops import int8 as ops_int8
from lightllm.quantization.bnb import int8 as bnb_int8
from lightllm.quantization.bnb import nf4

# The LoRA pieces of the backward pass (ops/lora.py) have no C++ kernel: the cpp backend hands them
# to the reference, which is what the product does too.
LORA_PIECES = ("lora_shrink", "lora_matmul", "lora_weight_grad")


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _lora_reference(x, w, bias, a, b, scale, grad):
    """Plain float64 LoRA on a dense weight: (y, dx, da, db, dbias)."""
    x, a, b = (t.double().detach().requires_grad_() for t in (x, a, b))
    bias64 = None if bias is None else bias.double().detach().requires_grad_()
    y = x @ w.double().t() + scale * (x @ a.t()) @ b.t()
    if bias64 is not None:
        y = y + bias64
    y.backward(grad.double())
    return y.detach(), x.grad, a.grad, b.grad, None if bias64 is None else bias64.grad


def _close(got, want, dtype=torch.float32):
    # relative to the reference's magnitude: float32 sums of K products, or one rounding to 16 bits
    eps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=4 * eps, atol=4 * eps * want.abs().max().item())


# (M, K, N, blocksize, double-quantized, bias): K not a multiple of the block (blocks straddle rows),
# odd K (rows start mid-byte), odd N, M = 1 (GEMV), 5, 16 and 17 (dequantize + GEMM above 16 rows).
CASES_4BIT = [
    (1, 128, 33, 64, True, True),
    (5, 70, 17, 32, False, False),
    (3, 65, 9, 64, True, True),
    (16, 64, 11, 64, False, True),
    (17, 96, 21, 64, True, False),
]


@pytest.mark.handover(*LORA_PIECES)
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", CASES_4BIT, ids=lambda c: "m{}k{}n{}b{}{}{}".format(*c[:4], "dq" * c[4],
                                                                                        "bias" * c[5]))
def test_fourbit_lora_linear_matches_plain_pytorch(backend, quant_type, case):
    m, k, n, blocksize, nested, has_bias = case
    w = _rand(n, k, seed=1, scale=0.1)
    packed, state = nf4.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    w_deq = nf4.dequantize_4bit(packed, state)  # what the layer computes with (bit-exact with bitsandbytes)
    x = _rand(m, k, seed=2).requires_grad_()
    a = _rand(4, k, seed=3, scale=0.2).requires_grad_()
    b = _rand(n, 4, seed=4, scale=0.2).requires_grad_()
    bias = _rand(n, seed=5).requires_grad_() if has_bias else None
    grad = _rand(m, n, seed=6)
    scale = 1.75
    with backends.use_backend(backend), backends.record_dispatches() as calls:
        y, s = torch.ops.lightllm.fourbit_lora_linear(x, packed.reshape(-1), state.absmax, blocksize, quant_type, n,
                                                      bias, a, b, scale, *ops_fourbit.nested_args(state))
        y.backward(grad)
    assert calls[0].op == "fourbit_lora_linear" and calls[0].ran == backend
    assert not any(c.op == "matmul_4bit" for c in calls)  # the base matmul is the fused op's own
    want = _lora_reference(x, w_deq, bias, a, b, scale, grad)
    _close(y, want[0])
    _close(s, x.detach().double() @ a.detach().double().t())
    for got, ref in zip((x.grad, a.grad, b.grad), want[1:4]):
        _close(got, ref)
    if has_bias:
        _close(bias.grad, want[4])


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])  # no bfloat16 under the interpreter
@pytest.mark.parametrize("m", [1, 9])
def test_fourbit_lora_linear_bfloat16(backend, m):
    k, n = 192, 40
    w = _rand(n, k, seed=7, scale=0.1)
    packed, state = nf4.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    w_deq = nf4.dequantize_4bit(packed, state).to(torch.bfloat16)
    x = _rand(m, k, seed=8).to(torch.bfloat16)
    a, b = _rand(8, k, seed=9, scale=0.1), _rand(n, 8, seed=10, scale=0.1)
    with backends.use_backend(backend):
        y = ops_fourbit.fourbit_lora_linear(x, packed, state.absmax, 64, "nf4", n, None, a, b, 2.0,
                                            *ops_fourbit.nested_args(state))
    assert y.dtype == torch.bfloat16
    want = x.double() @ w_deq.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    _close(y, want, torch.bfloat16)


def test_fourbit_lora_linear_opcheck_and_bad_input():
    w = _rand(12, 64, seed=11)
    packed, state = nf4.quantize_4bit(w, blocksize=32, compress_statistics=False, quant_type="nf4")
    x, a, b = _rand(3, 64, seed=12), _rand(2, 64, seed=13), _rand(12, 2, seed=14)
    with backends.use_backend("torch"):
        torch.library.opcheck(torch.ops.lightllm.fourbit_lora_linear.default,
                              (x.requires_grad_(), packed.reshape(-1), state.absmax, 32, "nf4", 12, None,
                               a.requires_grad_(), b.requires_grad_(), 0.5))
    with pytest.raises(ValueError, match=r"lora_b must be \[out_features, r\] = \[12, 2\]"):
        ops_fourbit.fourbit_lora_linear(x, packed, state.absmax, 32, "nf4", 12, None, a, b.t().contiguous(), 0.5)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        ops_fourbit.fourbit_lora_linear(x, packed, state.absmax, 48, "nf4", 12, None, a, b, 0.5)
    with pytest.raises(ValueError, match="packed holds"):
        ops_fourbit.fourbit_lora_linear(x[:, :32], packed, state.absmax, 32, "nf4", 12, None, a[:, :32], b, 0.5)


# (M, K, N, bias, threshold): odd N and K, M = 1 to 17, outlier columns (threshold 6) or none
CASES_INT8 = [
    (1, 64, 33, True, 0.0),
    (7, 70, 17, False, 6.0),
    (17, 40, 9, True, 6.0),
    (4, 33, 8, True, 0.0),
]


@pytest.mark.handover(*LORA_PIECES)
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES_INT8, ids=lambda c: "m{}k{}n{}{}t{}".format(*c[:3], "bias" * c[3], c[4]))
def test_int8_lora_linear_matches_plain_pytorch(backend, case):
    m, k, n, has_bias, threshold = case
    w = _rand(n, k, seed=21, scale=0.1)
    cb, scb, _ = bnb_int8.int8_vectorwise_quant(w.to(torch.float16))
    x = _rand(m, k, seed=22)
    if threshold:
        x[:, 3] *= 12.0  # an outlier column: multiplied in 16 bits by the dequantized weight
    x.requires_grad_()
    a = _rand(4, k, seed=23, scale=0.2).requires_grad_()
    b = _rand(n, 4, seed=24, scale=0.2).requires_grad_()
    bias = _rand(n, seed=25).requires_grad_() if has_bias else None
    grad = _rand(m, n, seed=26)
    scale = 0.625
    with backends.use_backend(backend), backends.record_dispatches() as calls:
        y, s = torch.ops.lightllm.int8_lora_linear(x, cb, scb, bias, threshold, a, b, scale)
        y.backward(grad)
    assert calls[0].op == "int8_lora_linear" and calls[0].ran == backend
    assert not any(c.op == "int8_linear" for c in calls)
    # the forward's base part is LLM.int8()'s (activations quantized too): the reference op, which
    # equals bitsandbytes bit for bit (tests/test_int8.py); the rank-r term and every gradient are
    # plain float64 on the dequantized weight W = CB * SCB / 127 (bitsandbytes' backward)
    w_deq = cb.double() * (scb.double() / 127.0).unsqueeze(1)
    want = _lora_reference(x, w_deq, bias, a, b, scale, grad)
    base = ops_int8.int8_linear_reference(x.detach(), cb, scb, None if bias is None else bias.detach(), threshold)
    lora = scale * (x.detach().double() @ a.detach().double().t()) @ b.detach().double().t()
    _close(y, base.double() + lora)
    for got, ref in zip((x.grad, a.grad, b.grad), want[1:4]):
        _close(got, ref)
    if has_bias:
        _close(bias.grad, want[4])


def test_int8_lora_linear_opcheck_and_bad_input():
    cb, scb, _ = bnb_int8.int8_vectorwise_quant(_rand(10, 24, seed=27).half())
    x, a, b = _rand(3, 24, seed=28), _rand(2, 24, seed=29), _rand(10, 2, seed=30)
    with backends.use_backend("torch"):
        torch.library.opcheck(torch.ops.lightllm.int8_lora_linear.default,
                              (x.requires_grad_(), cb, scb, None, 0.0, a.requires_grad_(), b.requires_grad_(), 2.0))
    with pytest.raises(ValueError, match="x has 23 features"):
        ops_int8.int8_lora_linear(x[:, :23], cb, scb, None, 0.0, a, b, 2.0)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, in_features\]"):
        ops_int8.int8_lora_linear(x, cb, scb, None, 0.0, a[:, :20], b, 2.0)


# ---- the LoRA layer on these bases ------------------------------------------------------------------

def _bases():
    torch.manual_seed(0)
    dense = nn.Linear(80, 30)
    return {
        "nf4": Linear4bit.from_linear(dense, quant_type="nf4"),
        "fp4-no-dq": Linear4bit.from_linear(dense, quant_type="fp4", compress_statistics=False, blocksize=32),
        "int8": Linear8bitLt.from_linear(dense, threshold=0.0),
        "int8-t6": Linear8bitLt.from_linear(dense, threshold=6.0),
    }


FUSED_OP = {"nf4": "fourbit_lora_linear", "fp4-no-dq": "fourbit_lora_linear", "int8": "int8_lora_linear",
            "int8-t6": "int8_lora_linear"}


@pytest.mark.parametrize("name", list(FUSED_OP))
def test_lora_layer_runs_the_fused_op_and_matches_the_dequantized_layer(name):
    """LoraLinear on the quantized layer against the same adapter on an nn.Linear holding the layer's
    dequantized weight, the plain PEFT arithmetic (for int8 the base's activation quantization makes
    the difference: compared with the quantized base's own output there)."""
    base = _bases()[name]
    layer = tuning.LoraLinear(base)
    torch.manual_seed(1)
    layer.add_adapter("default", r=6, alpha=9, init=False)
    x = _rand(2, 5, 80, seed=31).requires_grad_()
    with backends.record_dispatches() as calls:
        y = layer(x)
        y.square().sum().backward()
    ops = {c.op for c in calls}
    assert FUSED_OP[name] in ops and not ops & {"matmul_4bit", "int8_linear"}, ops
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    x0 = x.detach().clone().requires_grad_()
    a0, b0 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.no_grad():
        base_out = base(x0)  # the quantized layer alone: the base part of the reference
    if isinstance(base, Linear8bitLt):
        w = base.dequantize(torch.float32)
        y0 = base_out + scale * (x0 @ a0.t()) @ b0.t()
        # the base's output carries no gradient here: add dX = dY W through the dequantized weight
        y0 = y0 + (x0 @ w.t() - (x0 @ w.t()).detach())
    else:
        dense = nn.Linear(80, 30)
        with torch.no_grad():
            dense.weight.copy_(base.dequantize(torch.float32))
            dense.bias.copy_(base.bias)
        y0 = dense(x0) + scale * (x0 @ a0.t()) @ b0.t()
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x0.grad), (a.grad, a0.grad), (b.grad, b0.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dropout_in_training_takes_the_plain_path_with_the_same_arithmetic():
    base = _bases()["nf4"]
    layer = tuning.LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=4, dropout=0.5, init=False)
    x = _rand(3, 80, seed=32)
    with backends.record_dispatches() as calls:
        layer.train()
        layer(x)
    assert "fourbit_lora_linear" not in {c.op for c in calls}  # the mask applies to the adapter's input only
    layer.eval()  # dropout off: fused, and the same as the plain path computes
    fused = layer(x)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(fused, base(x) + layer.scaling["default"] * b(a(x)), rtol=1e-5, atol=1e-5)


def test_a_trainable_int8_weight_keeps_the_plain_path():
    torch.manual_seed(0)
    base = Linear8bitLt(40, 12, has_fp16_weights=True)
    layer = tuning.LoraLinear(base)
    layer.add_adapter("default", r=2, alpha=2, init=False)
    with backends.record_dispatches() as calls:
        layer(_rand(2, 40, seed=33))
    assert "int8_lora_linear" not in {c.op for c in calls}


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_the_fused_layer_traces_under_torch_compile(name):
    """fullgraph: the custom op with its fake implementation and autograd, no graph break."""
    layer = tuning.LoraLinear(_bases()[name])
    layer.add_adapter("default", r=4, alpha=8, init=False)
    x = _rand(5, 80, seed=34).requires_grad_()
    eager = layer(x)
    eager.sum().backward()
    grads = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager)
    for got, want in zip((x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad), grads):
        torch.testing.assert_close(got, want)


# ---- whole models: adapters, peft's layer, and training against peft + bitsandbytes ------------------

transformers = pytest.importorskip("transformers")


def _tiny_llama(config):
    from lightllm.quantization import quantize_

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    quantize_(model, config, progress=False)
    return model


class _Int8Twin(nn.Linear):
    """An int8 layer in plain PyTorch: LLM.int8()'s forward (the reference op, bitsandbytes' bits:
    the activations are quantized too), the gradient through the dequantized weight."""

    def __init__(self, layer: Linear8bitLt):
        super().__init__(layer.in_features, layer.out_features, layer.bias is not None)
        self.cb, self.scb, self.threshold = layer.weight.data, layer.weight.SCB, layer.threshold

    def forward(self, x):
        dense = nn.functional.linear(x, self.weight, self.bias)
        quantized = ops_int8.int8_linear_reference(x.detach(), self.cb, self.scb, self.bias, self.threshold)
        return quantized + (dense - dense.detach())


def _dequantized_twin(model):
    """The model with every 4-bit / int8 layer an nn.Linear holding its dequantized weight (int8:
    computing LLM.int8()'s forward with it)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            dense = (_Int8Twin(module) if isinstance(module, Linear8bitLt)
                     else nn.Linear(module.in_features, module.out_features, module.bias is not None))
            with torch.no_grad():
                dense.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bottleneck_adapters_on_quantized_bases(method):
    """Adapters wrap the base layer's output (or input): on a 4-bit or int8 base they compute what they
    compute on the dequantized model, and train."""
    from lightllm.quantization import Int8Config, NF4Config

    model = _tiny_llama(NF4Config() if method == "nf4" else Int8Config(threshold=0.0))
    twin = _dequantized_twin(model)
    config = dict(bottleneck_size=8, non_linearity="tanh", target_modules=["gate_proj", "up_proj", "down_proj"])
    ours = tuning.get_peft_model(model, tuning.AdapterConfig(**config))
    ref = tuning.get_peft_model(twin, tuning.AdapterConfig(**config))
    layers = [m for m in ours.modules() if isinstance(m, tuning.AdapterLayer)]
    assert len(layers) == 6 and all(isinstance(m.base_layer, (Linear4bit, Linear8bitLt)) for m in layers)
    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert params.keys() == ref_params.keys() and params
    with torch.no_grad():
        for i, (n, p) in enumerate(sorted(params.items())):
            p.copy_(_rand(*p.shape, seed=100 + i, scale=0.1))
            ref_params[n].copy_(p)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    out, want = ours(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    tol = 1e-4
    torch.testing.assert_close(out.logits, want.logits, rtol=tol, atol=tol)
    with ours.disable_adapter(), torch.no_grad():
        plain = ours(input_ids=ids).logits
    assert (out.logits - plain).abs().max() > 10 * tol  # the adapters change the output by far more
    out.loss.backward()
    want.loss.backward()
    for n, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-3, atol=1e-5)


def test_peft_layer_on_nf4_runs_the_fused_op():
    peft = pytest.importorskip("peft")
    from lightllm.integrations.peft import register_lightllm_layers
    from lightllm.quantization import NF4Config

    model = peft.get_peft_model(_tiny_llama(NF4Config()), register_lightllm_layers(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)))
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(6))
    with backends.record_dispatches() as calls:
        model(input_ids=ids, labels=ids).loss.backward()
    ops = [c.op for c in calls]
    assert ops.count("fourbit_lora_linear") == 4 and "matmul_4bit" in ops  # 4 wrapped layers; the rest plain


def _train(model, batches, steps, lr=2e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_training_on_the_embedded_model_tracks_peft_and_bitsandbytes(method, tmp_path):
    """The embedded model quantized by transformers + bitsandbytes (their CPU backend) with peft's
    LoRA, against that checkpoint loaded by lightllm (lightllm.models.load_model) with lightllm's
    LoRA (the fused ops): same weights bit for bit, same adapter init, same data, a few AdamW steps. Their CPU 4-bit matmul rounds about as bfloat16 does, so their losses are within
    that of ours; ours equal the dequantized model's (plain float32 LoRA) tightly."""
    peft = pytest.importorskip("peft")
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from lightllm.models import default_model_dir, load_model

    if method == "nf4":
        their_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
    else:
        their_config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=their_config,
                                                               device_map="cpu", dtype=torch.float32)
    # their quantized checkpoint, loaded by lightllm: the same weights bit for bit (checked below)
    theirs.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp_path)
    ours, tokenizer = load_model(tmp_path, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    n_same = 0
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            other = theirs.get_submodule(name)
            assert torch.equal(module.dequantize(), bnb_functional.dequantize_4bit(other.weight.data,
                                                                                    other.weight.quant_state))
            n_same += 1
        elif isinstance(module, Linear8bitLt):
            other = theirs.get_submodule(name)
            assert torch.equal(module.weight.data, other.weight.data)
            n_same += 1
    assert n_same == 4 * 7
    twin = _dequantized_twin(ours)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**lora))
    ours = tuning.get_peft_model(ours, tuning.LoraConfig(**lora))
    twin = tuning.get_peft_model(twin, tuning.LoraConfig(**lora))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs_params.keys() and len(mine) == 2 * 4 * len(targets)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if p.requires_grad:
                p.copy_(theirs_params[n])
        for n, p in mine.items():
            p.copy_(theirs_params[n])
    text = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
            "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :40]
    batches = [ids, ids.flip(1)]
    with backends.record_dispatches() as calls:
        our_losses = _train(ours, batches, 5)
    fused = "fourbit_lora_linear" if method == "nf4" else "int8_lora_linear"
    n_fused = sum(c.op == fused for c in calls)
    assert n_fused == 5 * 4 * len(targets), n_fused  # every wrapped layer, every step
    their_losses = _train(theirs, batches, 5)
    twin_losses = _train(twin, batches, 5)
    assert our_losses[-1] < our_losses[0] - 0.05  # it trains
    # LLM.int8 quantizes the activations at every layer and step: a rounding-level difference upstream
    # (summation order) can move an activation code by one, and the loss by ~1e-3 after a few steps
    # (seen: 4e-4 against the dequantized twin, 1.2e-3 against bitsandbytes); NF4 has no such steps
    twin_tol, their_tol = (2e-4, 2e-3) if method == "nf4" else (3e-3, 3e-3)
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(twin_losses), rtol=twin_tol, atol=0)
    # peft + bitsandbytes: within their CPU kernels' rounding, step by step, and the same progress
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=their_tol, atol=0)
    progress_ours, progress_theirs = our_losses[0] - our_losses[-1], their_losses[0] - their_losses[-1]
    assert abs(progress_ours - progress_theirs) < 0.05 * abs(progress_theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m", [1, 7, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_lora_ops_on_the_gpu(backend, m, dtype):
    """Both fused ops on CUDA tensors against float64 PyTorch (not yet run on a card)."""
    k, n, r = 320, 200, 16
    dev = torch.device("cuda")
    w = _rand(n, k, seed=41, scale=0.1)
    packed, state = nf4.quantize_4bit(w.to(dev), blocksize=64, compress_statistics=True, quant_type="nf4")
    w4 = nf4.dequantize_4bit(packed, state).double()
    cb, scb, _ = bnb_int8.int8_vectorwise_quant(w.to(dev, torch.float16))
    w8 = cb.double() * (scb.double() / 127.0).unsqueeze(1)
    x = _rand(m, k, seed=42).to(dev, dtype)
    a, b = _rand(r, k, seed=43, scale=0.1).to(dev), _rand(n, r, seed=44, scale=0.1).to(dev)
    lora = 1.5 * (x.double() @ a.double().t()) @ b.double().t()
    with backends.use_backend(backend):
        y4 = ops_fourbit.fourbit_lora_linear(x, packed, state.absmax, 64, "nf4", n, None, a, b, 1.5,
                                             *ops_fourbit.nested_args(state))
        y8 = ops_int8.int8_lora_linear(x, cb, scb, None, 0.0, a, b, 1.5)
    _close(y4, x.double() @ w4.t() + lora, dtype)
    _close(y8, ops_int8.int8_linear_reference(x, cb, scb, None, 0.0).double() + lora, dtype)
