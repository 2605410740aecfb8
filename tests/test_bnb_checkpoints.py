"""bitsandbytes-format checkpoints: what transformers + bitsandbytes write (load_in_4bit /
load_in_8bit, on the CPU) loads into lightllm's layers with the same logits, and what lightllm
writes loads into transformers + bitsandbytes with the same logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from lightllm.nn import Linear4bit, Linear8bitLt  # noqa: E402
from lightllm.quantization import BnbConfig, CheckpointError, load_quantized, quantize_model, save_quantized  # noqa: E402

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def dequantized_twin(model):
    """The same model with every quantized layer replaced by a float32 nn.Linear holding its
    dequantized weight: the exact reference for the quantized model's logits."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            dense = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


def assert_same_model(ours, theirs, method):
    """Same weights bit for bit (bitsandbytes' own dequantization of its layers equals ours); our
    logits equal the dequantized model's up to float32 rounding; for int8 the same pipeline bit for
    bit. bitsandbytes' CPU 4-bit matmul is less exact (about bfloat16 rounding): its logits agree
    with ours within that."""
    import bitsandbytes.functional as BF

    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            other = theirs.get_submodule(name)
            assert torch.equal(module.dequantize(), BF.dequantize_4bit(other.weight.data, other.weight.quant_state))
        elif isinstance(module, Linear8bitLt):
            other = theirs.get_submodule(name)
            assert torch.equal(module.weight.data, other.weight.data) and torch.equal(module.weight.SCB, other.weight.SCB)
    got, want = logits(ours), logits(theirs)
    if method == "int8":
        assert torch.equal(got, want)
        return
    torch.testing.assert_close(got, logits(dequantized_twin(ours)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


CONFIGS = {
    "nf4": (lambda: transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.float32),
            BnbConfig.nf4, Linear4bit),
    "fp4": (lambda: transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                    bnb_4bit_compute_dtype=torch.float32),
            BnbConfig.fp4, Linear4bit),
    "int8": (lambda: transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
             BnbConfig.int8, Linear8bitLt),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_checkpoint_transformers_writes_loads_with_the_same_logits(method, tmp_path):
    their_config, _, layer_class = CONFIGS[method]
    tiny_llama().save_pretrained(tmp_path / "dense")
    # dtype: transformers 4.x's bitsandbytes loading casts to float16 unless told (5.x keeps the file's)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=their_config(),
                                                               device_map="cpu", dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "quantized")
    ours = load_quantized(tmp_path / "quantized")
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, layer_class) and not isinstance(ours.lm_head, layer_class)
    assert ours.lightllm_quant_config.method == method
    assert_same_model(ours, theirs, method)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_our_checkpoint_loads_in_transformers_and_back(method, tmp_path):
    _, our_config, layer_class = CONFIGS[method]
    model = quantize_model(tiny_llama(), None, our_config(), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_class)
    ours = logits(model)
    save_quantized(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[f"load_in_{8 if method == 'int8' else 4}bit"]
    assert not (tmp_path / "ckpt" / "quantize_config.json").exists()
    # transformers' own bitsandbytes path (lightllm's integration, once imported, would take the file)
    from lightllm.integrations.transformers import without_lightllm

    with without_lightllm():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="cpu",
                                                                   dtype=torch.float32).eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert_same_model(model, theirs, method)
    again = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(again), ours)


def test_bad_bitsandbytes_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of load_in_4bit and load_in_8bit"):
        BnbConfig()
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    model = quantize_model(tiny_llama(), None, BnbConfig.nf4(), progress=False)
    save_quantized(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["load_in_8bit"] = True  # both
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unusable bitsandbytes quantization_config"):
        load_quantized(tmp_path / "ckpt")
