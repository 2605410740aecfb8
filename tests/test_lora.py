"""LoRA: the adapter math, adapters' lifecycle, PEFT's files both ways, quantized bases, errors."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightllm  # noqa: E402

from lightllm.nn import QuantLinear  # noqa: E402
from lightllm.quantization import QuantConfig, quantize_model  # noqa: E402
from lightllm.tuning import LoraConfig, LoraLinear, from_pretrained, get_peft_model  # noqa: E402

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_new_adapter_changes_nothing_and_the_math_is_base_plus_scaled_ba():
    model = tiny_llama()
    before = logits(model)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logits(lora), before)  # B starts at zero
    layer = lora.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.scaling["default"] == 2.0
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 64)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A["default"].weight.t()) @ layer.lora_B["default"].weight.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_gradients_reach_the_adapters_only():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    lora.train()
    lora(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in lora.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not isinstance(lora.model.lm_head, LoraLinear)  # all-linear leaves the output head alone


def test_adapters_add_set_delete_disable_merge():
    model = tiny_llama()
    base = logits(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    first = logits(lora)
    lora.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    assert torch.equal(logits(lora), first)  # still the default adapter
    lora.set_adapter("other")
    second = logits(lora)
    assert not torch.allclose(second, first)
    with lora.disable_adapter():
        assert torch.equal(logits(lora), base)
    lora.set_adapter("default")
    lora.merge_adapter()
    torch.testing.assert_close(logits(lora), first, rtol=1e-4, atol=1e-4)
    lora.unmerge_adapter()
    torch.testing.assert_close(logits(lora), first, rtol=1e-5, atol=1e-5)
    lora.delete_adapter("other")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        lora.set_adapter("other")
    plain = lora.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), first, rtol=1e-4, atol=1e-4)


def test_quantized_base_uses_the_epilogue_and_matches_the_training_path():
    model = tiny_llama()
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    lora = get_peft_model(model, LoraConfig(r=3, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    layer = lora.model.model.layers[1].mlp.down_proj
    assert isinstance(layer.base_layer, QuantLinear)
    x = torch.randn(7, 96)
    with torch.no_grad():
        fused = layer(x)  # rank-r term in the dequant-matmul epilogue
    plain = layer(x)  # grad enabled: the training op (gptq_lora_linear: S first, then the GEMM)
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="quantized"):
        lora.merge_adapter()


def test_peft_reads_our_adapter_and_we_read_peft_s(tmp_path):
    peft = pytest.importorskip("peft")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ours = get_peft_model(tiny_llama(), config)
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "up_proj"],
                                                              init_lora_weights=False))
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="matches no Linear"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="use_dora=True changes the adapter's math"):
        LoraConfig.from_dict({"r": 4, "use_dora": True, "target_modules": ["q_proj"]})
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        lora.set_adapter("missing")
    lora.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["r"] = 5  # the saved tensors are rank 4
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has shape \(4, 64\) but model.layers.0.self_attn.q_proj needs \(5, 64\)"):
        from_pretrained(tiny_llama(), tmp_path / "a")
    copy.deepcopy(lora)  # the wrapper stays an ordinary module


def test_training_the_embedded_model_matches_peft_with_adamw():
    """LoRA r = 8 on the attention projections, 100 steps on the first half of the held-out plays;
    perplexity on the other half within 2% of peft's LoRA trained with torch's AdamW."""
    peft = pytest.importorskip("peft")
    from lightllm import data
    from lightllm.eval import perplexity, tokenize_stream
    from lightllm.models import load_model
    from lightllm.optim import AdamW8bit

    text = data.shakespeare_text("heldout")
    train_text, eval_text = text[: len(text) // 2], text[len(text) // 2:]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]

    def train(ours: bool) -> float:
        model, tokenizer = load_model(device="cpu")
        torch.manual_seed(0)
        if ours:
            wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            opt = AdamW8bit([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
        else:
            wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
        ids = tokenize_stream(tokenizer, train_text)
        wrapped.train()
        for batch in data.calibration_samples(ids, 400, 128, seed=1).view(100, 4, 128):
            wrapped(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        wrapped.eval()
        return perplexity(wrapped, tokenizer, eval_text, seqlen=256, progress=False)

    ours, theirs = train(True), train(False)
    assert abs(ours - theirs) <= 0.02 * theirs, (ours, theirs)


# ---- the fused layer against the plain formula --------------------------------------------------

def _base_layer(kind, k, n, dtype, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(k, n, dtype=dtype)
    if kind == "conv1d":  # GPT-2's layer: weight stored [in, out]
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(n, k)
        torch.nn.init.normal_(layer.weight, std=k ** -0.5)
        torch.nn.init.normal_(layer.bias, std=0.1)
        return layer.to(dtype)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n), 4, 32, sym=False)
    if kind == "quant-act-order":  # groups scattered over K: the module permutes x and A
        state = q.state_dict()
        state["g_idx"] = (torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(seed))) // 32).int()
        q.load_state_dict(state)
    return q.to(dtype=dtype) if dtype != torch.float32 else q


def _dense_weight(base):
    if isinstance(base, QuantLinear):
        return base.dequantize(torch.float64)
    w = base.weight.detach().double()
    return w.t() if type(base).__name__ == "Conv1D" else w


def check_fused_layer(kind, backend, tokens, dtype, device, monkeypatch):
    """Forward (training and inference paths) and the gradients of x, A and B of a LoraLinear whose
    fused path must serve, against float64 autograd of the formula on the same weights."""
    layer = LoraLinear(_base_layer(kind, 96 if device == "cpu" else 1032, 40 if device == "cpu" else 776, dtype))
    layer.to(device)
    layer.add_adapter("default", 3, 6, init=False)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(*tokens, layer.in_features).to(dtype).to(device).requires_grad_()

    def fused_only(self, inp):  # the fused ops must serve, not the plain path
        out = LoraLinear._fused_forward(self, inp, "default")
        assert out is not None, "the fused path declined"
        return out

    monkeypatch.setattr(LoraLinear, "forward", fused_only)
    with lightllm.use_backend(backend):
        y = layer(x)
        grad = torch.randn(y.shape).to(dtype).to(device)
        gx, ga, gb = torch.autograd.grad(y, [x, a, b], grad)
        with torch.no_grad():  # the inference path (one launch at up to 16 tokens)
            y_inf = layer(x)
    base = layer.base_layer
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().double()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ _dense_weight(base).t() + 2.0 * (x64 @ a64.t()) @ b64.t()
    if bias is not None:
        y64 = y64 + bias
    e = torch.autograd.grad(y64, [x64, a64, b64], grad.double())
    tol = (8 if dtype == torch.float32 else 16) * torch.finfo(dtype).eps
    assert y.dtype == dtype and y.shape == (*tokens, layer.out_features)
    for got, want in [(y, y64), (y_inf, y64), (gx, e[0]), (ga, e[1]), (gb, e[2])]:
        assert (got.double() - want.detach()).abs().max() <= tol * want.abs().max() + 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d", "quant", "quant-act-order"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", [(1,), (2, 7), (3, 11)])
def test_fused_layer_forward_and_backward_match_the_formula(kind, backend, tokens, monkeypatch):
    if backend not in lightllm.available_backends():
        pytest.skip(f"{backend} cannot run here")
    dtype = torch.float16 if kind == "linear" and len(tokens) == 2 else torch.float32
    check_fused_layer(kind, backend, tokens, dtype, "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "conv1d", "quant", "quant-act-order"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("tokens", [(1,), (3, 5), (700,)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_gpu(kind, backend, tokens, dtype, monkeypatch):
    if lightllm.backends.why_unavailable(backend) is not None:
        pytest.skip(f"{backend}: {lightllm.backends.why_unavailable(backend)}")
    if kind.startswith("quant") and dtype == torch.bfloat16:
        pytest.skip("GPTQ scales are float16; the bf16 QuantLinear path is covered in test_quant_linear.py")
    check_fused_layer(kind, backend, tokens, dtype, "cuda", monkeypatch)


def test_dropout_while_training_takes_the_plain_path_with_peft_s_results():
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.25, init_lora_weights=False)
    ours = get_peft_model(tiny_llama(), LoraConfig(**config)).train()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).train()
    for name, p in ours.named_parameters():  # the same adapter weights in both
        if ".lora_" in name:
            p.data.copy_(dict(theirs.named_parameters())[name].data)
    torch.manual_seed(5)
    out = ours(input_ids=IDS, labels=IDS)
    torch.manual_seed(5)
    ref = theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_merge_into_a_quantized_base_requantizes_when_asked():
    model = tiny_llama()
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    layer = lora.model.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    with pytest.raises(ValueError, match="requantize=True"):
        lora.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in layer.base_layer.state_dict().items()), "a refused merge changes nothing"
    unmerged = logits(lora)
    w0 = layer.base_layer.dequantize(torch.float32)
    lora.merge_adapter(requantize=True)
    merged = logits(lora)
    # The merged weight is base + delta rounded to a new 4-bit grid: within half a step of it.
    base = layer.base_layer
    step = base.scales.float()[base.g_idx.long()].t()  # [N, K]; requantized groups are sequential
    assert base._perm is None
    err = (base.dequantize(torch.float32) - (w0 + layer.delta_weight("default"))).abs()
    assert bool((err <= 0.51 * step + 1e-6).all()), (err / step).max()
    assert layer.merged_adapters == ["default"]
    assert not torch.equal(merged, unmerged)
    assert (merged - unmerged).norm() / unmerged.norm() < 0.05
    lora.unmerge_adapter()
    assert (logits(lora) - unmerged).norm() / unmerged.norm() < 0.05


def tiny_llama_with_bias(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True)).eval()


@pytest.mark.parametrize("bias,modules_to_save", [("all", None), ("lora_only", ["lm_head"]), ("none", ["model.norm"])])
def test_trained_biases_and_modules_to_save_travel_in_peft_s_files(tmp_path, bias, modules_to_save):
    peft = pytest.importorskip("peft")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=modules_to_save,
                  init_lora_weights=False)
    ours = get_peft_model(tiny_llama_with_bias(), LoraConfig(**config))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs = peft.get_peft_model(tiny_llama_with_bias(), peft.LoraConfig(**config))
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():  # train the extra parts a little so that the files carry something
        for n, p in ours.named_parameters():
            if p.requires_grad and ".lora_" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    expected = logits(ours)
    if bias == "none":  # disabled, the model is the base model (the saved module's original runs)
        with ours.disable_adapter():
            assert torch.equal(logits(ours), logits(tiny_llama_with_bias()))
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama_with_bias(), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "theirs")
    back = from_pretrained(tiny_llama_with_bias(), tmp_path / "theirs")
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(31, 4)
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"v_proj.lora_B.weight has shape \(31, 4\) but "
                                         r"model.layers.1.self_attn.v_proj needs \(32, 4\)"):
        from_pretrained(model, tmp_path / "a")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    target = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        target.load_adapter(tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_wrapped_model_compiles():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = logits(lora)
    compiled = torch.compile(lora.model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


# ---- PEFT's rules for adapters, saved modules and loading ----------------------------------------

def test_loading_into_an_existing_adapter_that_lacks_a_target_changes_nothing(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).save_pretrained(tmp_path / "qv")
    target = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="puts LoRA on model.layers.0.self_attn.v_proj, where adapter 'default' has none"):
        target.load_adapter(tmp_path / "qv", "default")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    target.load_adapter(tmp_path / "qv", "other")  # under a new name it fits
    assert "other" in target.peft_config


def test_switching_adapters_on_a_merged_model_unmerges_first_as_peft_does():
    peft = pytest.importorskip("peft")
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                p.copy_(dict(ours.named_parameters())[name])
    for model in (ours, theirs):
        model.merge_adapter()
        model.set_adapter("other")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(tiny_llama()), rtol=1e-5, atol=1e-5)


def test_modules_to_save_takes_precedence_and_its_copy_answers():
    peft = pytest.importorskip("peft")
    config = dict(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj", "lm_head"])
    ours = get_peft_model(tiny_llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    head = ours.model.lm_head
    assert head.weight is head.modules_to_save["default"].weight and head.weight.requires_grad
    with ours.disable_adapter():
        assert head.weight is head.original_module.weight


def test_the_fused_path_runs_only_for_the_plain_layers():
    class Doubled(torch.nn.Linear):  # its own forward: the fused ops may not stand in for it
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(3, 8)
    for base in (Doubled(8, 4), torch.nn.Linear(8, 4)):
        layer = LoraLinear(base)
        layer.add_adapter("default", 2, 2)
        calls = []
        base.register_forward_pre_hook(lambda m, a: calls.append(1))
        torch.testing.assert_close(layer(x), base(x))  # B = 0
        assert len(calls) == 2, "the base layer's hooks run"


def test_a_fresh_adapter_leaves_half_precision_outputs_bit_identical():
    model = tiny_llama().half()
    before = logits(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(lora), before)


def test_loaded_adapters_are_frozen_unless_trainable(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["inference_mode"] is True
    frozen = from_pretrained(tiny_llama(), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = from_pretrained(tiny_llama(), tmp_path / "a", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}


def test_config_rules_follow_peft():
    with pytest.raises(ValueError, match=r"matches model.embed_tokens \(Embedding\).*wraps nn.Linear"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    assert set(lora.lora_layers()) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1],
                                                   layers_pattern="layers"))
    assert set(lora.lora_layers()) == {"model.layers.1.self_attn.q_proj"}
    with pytest.raises(ValueError, match="need target_modules as a list"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="only one adapter with bias"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], bias="all")).add_adapter(
            "other", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="kasa_config"):
        LoraConfig.from_dict({"target_modules": ["q_proj"], "kasa_config": {}})


def test_quantized_layer_checks_the_rank_r_operands():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"lora_s must be a float \[tokens, r\] = \[2, r\]"):
        q.forward_with_lora(x, lora_s=torch.randn(1, 4), lora_b=torch.randn(32, 4), lora_scale=1.0)
    with pytest.raises(ValueError, match="lora_b goes with lora_a or lora_s"):
        q.forward_with_lora(x, lora_s=torch.randn(2, 4), lora_scale=1.0)
