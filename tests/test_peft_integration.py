"""peft's own get_peft_model on a model quantized by lightllm: lightllm.integrations.peft registers
lightllm's layers with peft's custom-module dispatch; the fused ops run, the results are those of
lightllm.tuning.get_peft_model, and the files go both ways."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from lightllm import backends, tuning  # noqa: E402
from lightllm.integrations.peft import LightllmLoraLinear, register_lightllm_layers  # noqa: E402
from lightllm.nn import Linear4bit, Linear8bitLt, QuantLinear  # noqa: E402
from lightllm.quantization import Int8Config, NF4Config, RTNConfig, quantize_  # noqa: E402

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)


def quantized_llama(config=None):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    quantize_(model, config or RTNConfig(bits=4, group_size=32), progress=False)
    return model


def lora_kwargs(**kw):
    return dict(dict(r=4, lora_alpha=8, target_modules=TARGETS), **kw)


def both(init=True, quant=None):
    """lightllm's get_peft_model and peft's (with lightllm's layers registered), from the same seed."""
    model = quantized_llama(quant)
    torch.manual_seed(1)
    ours = tuning.get_peft_model(model, tuning.LoraConfig(**lora_kwargs(init_lora_weights=init)))
    model = quantized_llama(quant)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(model, register_lightllm_layers(peft.LoraConfig(**lora_kwargs(init_lora_weights=init))))
    return ours, theirs


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


class CustomOps(TorchDispatchMode):
    """The lightllm custom ops called, with whether gptq_matmul got the rank-r operands."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("lightllm::"):
            with_lora = name == "lightllm::gptq_matmul" and (args[6] is not None or args[7] is not None)
            self.calls.append(name + (" +lora" if with_lora else ""))
        return func(*args, **(kwargs or {}))


def test_peft_wraps_quantlinear_in_our_layer_and_runs_the_fused_ops():
    model = peft.get_peft_model(quantized_llama(), register_lightllm_layers(
        peft.LoraConfig(**lora_kwargs(init_lora_weights=False))))
    layers = [m for m in model.modules() if isinstance(m, LightllmLoraLinear)]
    assert len(layers) == N_LAYERS
    assert all(isinstance(m, peft.tuners.lora.LoraLayer) and isinstance(m.base_layer, QuantLinear) for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    assert set(adapter_params(model)) and all(".lora_A." in n or ".lora_B." in n for n in adapter_params(model))

    model.eval()  # inference: gptq_matmul with the rank-r term in its epilogue, one call per layer
    with backends.record_dispatches() as calls, CustomOps() as ops, torch.no_grad():
        model(input_ids=IDS)
    assert ops.calls.count("lightllm::gptq_matmul +lora") == N_LAYERS
    assert ops.calls.count("lightllm::gptq_matmul") == 14 - N_LAYERS  # the layers without LoRA
    assert sum(c.op == "gptq_matmul" for c in calls) == 14

    model.train()  # training: gptq_lora_linear (S = x A^T, then the GEMM with S in the epilogue)
    with backends.record_dispatches() as calls, CustomOps() as ops:
        loss = model(input_ids=IDS, labels=IDS).loss
    assert ops.calls.count("lightllm::gptq_lora_linear") == N_LAYERS
    assert "lightllm::gptq_matmul +lora" not in ops.calls
    assert sum(c.op == "lora_shrink" for c in calls) == N_LAYERS
    loss.backward()
    for name, p in adapter_params(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_results_as_our_get_peft_model_through_training():
    ours, theirs = both(init=True)
    mine, peft_s = adapter_params(ours), adapter_params(theirs)
    assert set(mine) == set(peft_s) and len(mine) == 2 * N_LAYERS
    for n in mine:  # same seed, same init (A Kaiming-uniform, B zeros)
        assert torch.equal(mine[n], peft_s[n]), n
    opt_ours = torch.optim.AdamW(mine.values(), lr=1e-2)
    opt_theirs = torch.optim.AdamW(peft_s.values(), lr=1e-2)
    ours.train()
    theirs.train()
    for _ in range(3):
        out, ref = ours(input_ids=IDS, labels=IDS), theirs(input_ids=IDS, labels=IDS)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        out.loss.backward()
        ref.loss.backward()
        for n in mine:
            torch.testing.assert_close(mine[n].grad, peft_s[n].grad, rtol=1e-4, atol=1e-6)
        for opt in (opt_ours, opt_theirs):
            opt.step()
            opt.zero_grad()
    assert any(p.abs().sum() > 0 for n, p in mine.items() if ".lora_B." in n)  # it trained
    torch.testing.assert_close(logits(ours.eval()), logits(theirs.eval()), rtol=1e-5, atol=1e-5)


def test_files_go_both_ways(tmp_path):
    ours, theirs = both(init=False)
    for n, p in adapter_params(ours).items():  # our init=False differs from peft's: the same weights in both
        p.data.copy_(adapter_params(theirs)[n].data)
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert len(keys) == 2 * N_LAYERS and all(k.startswith("base_model.model.") for k in keys)

    for folder in ("peft", "ours"):
        config = register_lightllm_layers(peft.LoraConfig.from_pretrained(tmp_path / folder))
        loaded = peft.PeftModel.from_pretrained(quantized_llama(), tmp_path / folder, config=config)
        assert sum(isinstance(m, LightllmLoraLinear) for m in loaded.modules()) == N_LAYERS
        torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    ours_loaded = tuning.from_pretrained(quantized_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours_loaded), expected, rtol=1e-5, atol=1e-5)


def test_adapter_switching_disabling_and_merge_and_unload():
    ours, theirs = both(init=False)
    for n, p in adapter_params(ours).items():
        p.data.copy_(adapter_params(theirs)[n].data)
    base = logits(quantized_llama())
    with_lora = logits(theirs)
    with theirs.disable_adapter():
        torch.testing.assert_close(logits(theirs), base, rtol=0, atol=0)
    theirs.add_adapter("other", register_lightllm_layers(peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                         init_lora_weights=False)))
    theirs.set_adapter("other")
    assert not torch.allclose(logits(theirs), with_lora)
    theirs.set_adapter("default")
    torch.testing.assert_close(logits(theirs), with_lora, rtol=0, atol=0)
    theirs.delete_adapter("other")

    # merging into QuantLinear quantizes the merged weight again: the same lossy result as ours
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        merged = theirs.merge_and_unload()
    assert not any(isinstance(m, LightllmLoraLinear) for m in merged.modules())
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 14
    torch.testing.assert_close(logits(merged), logits(ours.merge_and_unload(requantize=True)), rtol=1e-5, atol=1e-5)
    # lossy, but the merged model is the adapted one, not the base
    assert (logits(merged) - with_lora).abs().mean() < 0.5 * (base - with_lora).abs().mean()


@pytest.mark.parametrize("quant, layer_type", [(NF4Config, Linear4bit), (Int8Config, Linear8bitLt)])
def test_bitsandbytes_style_layers_too(quant, layer_type):
    ours, theirs = both(init=False, quant=quant())
    layers = [m for m in theirs.modules() if isinstance(m, LightllmLoraLinear)]
    assert len(layers) == N_LAYERS and all(type(m.base_layer) is layer_type for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)
    for n, p in adapter_params(ours).items():
        p.data.copy_(adapter_params(theirs)[n].data)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


def test_all_linear_counts_our_layers_when_given_the_model():
    model = quantized_llama()
    config = register_lightllm_layers(peft.LoraConfig(r=2, target_modules="all-linear"), model)
    wrapped = peft.get_peft_model(model, config)
    layers = [m for m in wrapped.modules() if isinstance(m, LightllmLoraLinear)]
    assert len(layers) == 14 and not isinstance(wrapped.base_model.model.lm_head, LightllmLoraLinear)


def test_the_integration_imports_peft_only_when_used():
    import subprocess
    import sys

    code = "import sys, lightllm.integrations.peft; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="does not implement use_dora"):
        peft.get_peft_model(quantized_llama(), register_lightllm_layers(peft.LoraConfig(**lora_kwargs(use_dora=True))))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(quantized_llama(), register_lightllm_layers(
            peft.LoraConfig(**lora_kwargs(init_lora_weights="pissa"))))
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        register_lightllm_layers(tuning.LoraConfig(r=4))
