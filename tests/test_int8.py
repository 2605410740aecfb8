"""LLM.int8(): the functional API bit for bit against the real bitsandbytes on its CPU path, the
Linear8bitLt module (outputs, state dicts both ways, quantize-on-move, trainable weights, errors),
and LoRA on it."""

import copy

import pytest
import torch

from lightllm import functional as F
from lightllm.nn import Linear8bitLt

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402


def activations(rows, cols, dtype, seed, outliers=()):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 1.5
    for col in outliers:  # LLM.int8's systematic outlier features: a few columns, large in many rows
        x[::2, col] = 20.0 * torch.sign(x[::2, col])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [1, 17])
def test_vectorwise_quant_equals_bitsandbytes(dtype, threshold, rows):
    x = activations(rows, 96, dtype, rows, outliers=(5, 77))
    theirs = BF.int8_vectorwise_quant(x.clone(), threshold)
    ours = F.int8_vectorwise_quant(x, threshold)
    assert torch.equal(ours[0], theirs[0]) and ours[0].dtype == torch.int8
    assert torch.equal(ours[1], theirs[1]) and ours[1].dtype == torch.float32
    if threshold:
        assert torch.equal(ours[2], theirs[2]) and ours[2].tolist() == [5, 77]
    else:
        assert ours[2] is None and theirs[2] is None
    # the definition, written out: codes within half a step of x * 127 / rowmax (outliers left out)
    kept = x.float().masked_fill(x.float().abs() >= threshold, 0) if threshold else x.float()
    expected = kept * 127 / kept.abs().amax(1, keepdim=True)
    if threshold and rows > 1:
        expected[:, [5, 77]] = 0  # whole outlier columns go the 16-bit way
    assert ((ours[0].float() - expected).abs() <= 0.5 + 1e-3).all()


def test_all_zero_rows_get_zero_codes():
    x = torch.randn(3, 40).half()
    x[1] = 0
    codes, stats, _ = F.int8_vectorwise_quant(x)
    assert stats[1] == 0 and (codes[1] == 0).all()


def test_matmul_dequant_and_the_mixed_product_equal_bitsandbytes():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (9, 4096), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (70, 4096), dtype=torch.int8, generator=gen)
    product = F.int8_linear_matmul(a, b)
    assert product.dtype == torch.int32 and torch.equal(product, a.long() @ b.long().t())  # exact
    assert torch.equal(product, BF.int8_linear_matmul(a, b))
    row, col, bias = torch.rand(9) * 3, torch.rand(70) * 3, torch.randn(70).half()
    assert torch.equal(F.int8_mm_dequant(product, row, col, bias=bias), BF.int8_mm_dequant(product, row, col, bias=bias))
    x = activations(9, 4096, torch.float16, 3, outliers=(1, 2048))
    ca, sca, cols = F.int8_vectorwise_quant(x, 6.0)
    ours, sub = F.int8_mixed_scaled_mm(x, ca, b, sca, col, cols, bias)
    theirs, their_sub = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, ca, b, sca, col, cols, bias)
    assert torch.equal(ours, theirs) and torch.equal(sub, their_sub)
    assert torch.equal(F.int8_vectorwise_dequant(b, col), BF.int8_vectorwise_dequant(b, col))


def bnb_layer(linear, threshold):
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_outputs_equal_bitsandbytes_both_ways(threshold, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 72).to(dtype)
    theirs = bnb_layer(linear, threshold)
    ours = Linear8bitLt.from_linear(linear, threshold=threshold).eval()
    x = activations(14, 256, dtype, 1, outliers=(3, 200)).view(2, 7, 256)
    assert torch.equal(ours(x), theirs(x))
    assert ours(x).dtype == dtype and ours(x).shape == (2, 7, 72)
    sd = ours.state_dict()
    assert sorted(sd) == sorted(theirs.state_dict()) == ["SCB", "bias", "weight", "weight_format"]
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32 and int(sd["weight_format"]) == 0
    for key in ("weight", "SCB"):
        assert torch.equal(sd[key], theirs.state_dict()[key])
    # their checkpoint into a fresh layer of ours (not moved first: bitsandbytes would refuse)
    fresh = Linear8bitLt(256, 72, has_fp16_weights=False, threshold=threshold).eval()
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh(x), theirs(x))
    # ours into theirs
    target = bnb.nn.Linear8bitLt(256, 72, has_fp16_weights=False, threshold=threshold).to("cpu").eval()
    target.load_state_dict(sd)
    assert torch.equal(target(x), ours(x))


def test_outlier_columns_are_kept_in_16_bits():
    """With a threshold the outlier features do not flatten the other columns' codes: the layer's
    error against float64 drops, as LLM.int8 promises."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 64)
    x = activations(16, 512, torch.float32, 2, outliers=(7, 100, 300))
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    plain = Linear8bitLt.from_linear(linear, threshold=0.0)(x)
    mixed = Linear8bitLt.from_linear(linear, threshold=6.0)(x)
    assert (mixed.double() - exact).norm() < 0.5 * (plain.double() - exact).norm()


def test_backward_through_the_int8_weight_and_a_trainable_dense_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).half()
    frozen = Linear8bitLt.from_linear(linear)
    x = torch.randn(5, 64).half().requires_grad_()
    y = frozen(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = frozen.weight.data.half() * (frozen.weight.SCB * (1 / 127)).unsqueeze(1).half()
    torch.testing.assert_close(x.grad, g @ w, rtol=2e-3, atol=2e-3)
    assert frozen.bias.grad is not None and not frozen.weight.requires_grad
    trainable = Linear8bitLt(64, 32, has_fp16_weights=True)
    assert trainable.weight.requires_grad and trainable.weight.dtype == torch.float32
    target = torch.nn.Linear(64, 32)
    dense = torch.nn.Linear(64, 32)  # the same start, trained in float32: the int8 forward should track it
    with torch.no_grad():
        dense.weight.copy_(trainable.weight)
        dense.bias.copy_(trainable.bias)
    inputs = torch.randn(64, 64)
    final = []
    for layer in (trainable, dense):
        opt = torch.optim.SGD(layer.parameters(), lr=0.3)
        losses = []
        for _ in range(40):
            loss = (layer(inputs) - target(inputs).detach()).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], losses
        final.append(losses[-1])
    assert abs(final[0] - final[1]) < 0.1 * final[1], final
    assert "weight_format" not in trainable.state_dict()  # a trainable weight is saved dense, as bitsandbytes does


def test_quantized_on_the_move_and_copies_keep_the_state():
    layer = Linear8bitLt(48, 16, has_fp16_weights=False)
    dense = layer.weight.detach().clone()
    assert layer.weight.dtype == torch.float32
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB.shape == (16,)
    assert (layer.dequantize() - dense).abs().max() <= dense.abs().amax(1).max() / 127
    x = torch.randn(3, 48)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), layer(x)) and clone.weight.SCB is not layer.weight.SCB


def test_bad_checkpoints_and_inputs_are_refused_and_change_nothing():
    layer = Linear8bitLt.from_linear(torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = dict(before)
    del sd["SCB"]
    with pytest.raises(RuntimeError, match="needs its float32 per-row absmax SCB"):
        layer.load_state_dict(sd)
    sd = dict(before)
    sd["weight_format"] = torch.tensor(1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="only the row-major int8 format"):
        layer.load_state_dict(sd)
    sd = dict(before)
    sd["weight"] = torch.zeros(8, 31, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"shape \(8, 31\)"):
        layer.load_state_dict(sd)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="input has 30 features"):
        layer(torch.randn(2, 30))
    with pytest.raises(ValueError, match="threshold must be"):
        Linear8bitLt(4, 4, threshold=-1.0)
    with pytest.raises(ValueError, match="int8 tensors"):
        F.int8_linear_matmul(torch.ones(2, 2), torch.ones(2, 2))


def test_lora_on_an_int8_base():
    from lightllm.tuning import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model[0] = Linear8bitLt.from_linear(model[0], threshold=6.0)
    model[2] = Linear8bitLt.from_linear(model[2])
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(16, 32)
    target = torch.randn(16, 8)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(20):
        loss = (lora(x) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.8 * first
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
