"""LoRA: the adapter math, adapters' lifecycle, PEFT's files both ways, quantized bases, errors."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
    plain = layer(x)  # grad enabled: the plain path
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
