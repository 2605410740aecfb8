"""The one quantization API: ``quantize_(model, config)`` over every registered method, the registry,
configs read back from checkpoints, and the older entry points giving the same layers."""

import dataclasses
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lightllm.nn import Linear4bit, Linear8bitLt, QuantLinear  # noqa: E402
from lightllm.quantization import (  # noqa: E402
    BnbConfig,
    FP4Config,
    GPTQConfig,
    Int8Config,
    LayerListNotFoundError,
    NF4Config,
    QuantConfig,
    RTNConfig,
    config_from_dict,
    load_quantized,
    make_config,
    methods,
    quantize_,
    quantize_linears_rtn,
    quantize_model,
    quantize_rtn,
    save_quantized,
    unpack_gptq,
)
from lightllm.quantization.bnb import nf4 as nf4_format  # noqa: E402

VOCAB = 80
CALIB = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(3))
EXPECTED_LAYER = {"gptq": QuantLinear, "rtn": QuantLinear, "nf4": Linear4bit, "fp4": Linear4bit,
                  "int8": Linear8bitLt}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def config_for(method: str):
    # small groups so that the 64- and 96-wide layers of the tiny model are quantized
    return make_config(method, bits=4, group_size=32) if method in ("gptq", "rtn") else make_config(method)


def test_every_method_is_registered_with_its_class():
    assert set(methods()) == {"gptq", "rtn", "nf4", "fp4", "int8"}
    assert type(make_config("gptq")) is GPTQConfig and type(make_config("rtn")) is RTNConfig
    assert type(make_config("nf4")) is NF4Config and type(make_config("fp4")) is FP4Config
    assert type(make_config("int8", threshold=0.0)) is Int8Config
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        make_config("awq")
    with pytest.raises(ValueError, match="RTNConfig: method is 'rtn'"):
        RTNConfig(method="gptq")
    # the method names the CLI offers are the registry's
    from lightllm.__main__ import QUANT_METHODS
    assert set(QUANT_METHODS) == set(methods())


@pytest.mark.parametrize("method", ["gptq", "rtn", "nf4", "fp4", "int8"])
def test_quantize_then_save_and_load_recognises_the_method(method, tmp_path):
    model = tiny_llama()
    config = config_for(method)
    quantize_(model, config, CALIB if config.needs_calibration else None, progress=False)
    layers = [m for m in model.modules() if isinstance(m, EXPECTED_LAYER[method])]
    assert len(layers) == 14  # 7 per block; the output head stays dense
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, tuple(EXPECTED_LAYER.values()))
    assert model.lightllm_quant_config is config
    out = save_quantized(model, tmp_path / method)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    # transformers' format has no "the input's dtype": a compute dtype of None is written as its default
    expected_config = dict(dataclasses.asdict(config), **({"bnb_4bit_compute_dtype": "float32"}
                                                           if isinstance(config, BnbConfig) else {}))
    for read in (config_from_dict(quant), load_quantized(out).lightllm_quant_config):
        assert type(read) is type(config) and dataclasses.asdict(read) == expected_config
    loaded = load_quantized(out)
    with torch.no_grad():
        expected = model(input_ids=CALIB[:2]).logits
        got = loaded(input_ids=CALIB[:2]).logits
    # GPTQ checkpoints store the dense tensors in float16 by default
    tol = 2e-2 if method in ("gptq", "rtn") else 0
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_rtn_layers_equal_round_to_nearest_of_each_weight():
    """Against quantize_rtn on the weight itself (the grid's spec), layer by layer."""
    model = tiny_llama()
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, RTNConfig(bits=3, group_size=32), progress=False)
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        reference = quantize_rtn(dense[name], 3, 32, sym=True)
        got = unpack_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3, "gptq")
        assert torch.equal(got["q"], reference["q"]), name


def test_nf4_layers_hold_bitsandbytes_codes_of_each_weight():
    model = tiny_llama()
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, NF4Config(double_quant=False), progress=False)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            packed, state = nf4_format.quantize_4bit(dense[name], blocksize=64, quant_type="nf4")
            assert torch.equal(layer.weight.data.reshape(-1), packed.reshape(-1)), name
            assert torch.equal(layer.quant_state.absmax, state.absmax), name


def test_conv1d_layers_are_transposed_for_every_format():
    """GPT-2 stores its projections as Conv1D ([in, out]): each replacement computes the same map."""
    for config in (Int8Config(threshold=0.0), NF4Config(double_quant=False), RTNConfig(bits=8, group_size=32)):
        model = tiny_gpt2()
        x = torch.randn(3, 64)
        attn = model.transformer.h[0].attn.c_attn
        with torch.no_grad():
            before = attn(x)
        quantize_(model, config, progress=False)
        replaced = model.transformer.h[0].attn.c_attn
        assert isinstance(replaced, (Linear8bitLt, Linear4bit, QuantLinear)), type(replaced)
        with torch.no_grad():
            after = replaced(x)
        rel = ((after - before).norm() / before.norm()).item()
        assert rel < {"int8": 0.02, "nf4": 0.15, "rtn": 0.02}[config.method], (config.method, rel)


def test_blocks_only_methods_and_whole_model_methods():
    """GPTQ and RTN quantize the transformer blocks (as AutoGPTQ); bitsandbytes' formats every
    Linear but the skipped ones (as transformers), on models without a block list too."""
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_(mlp, Int8Config(), progress=False)
    assert isinstance(mlp[0], Linear8bitLt) and isinstance(mlp[2], Linear8bitLt)
    with pytest.raises(LayerListNotFoundError):
        quantize_(nn.Sequential(nn.Linear(64, 64)), RTNConfig(group_size=32), progress=False)
    model = tiny_llama()
    quantize_(model, NF4Config(skip_modules=["down_proj"]), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert not isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)


def test_bad_input_is_refused_clearly():
    model = tiny_llama()
    with pytest.raises(ValueError, match="'gptq' needs calibration data"):
        quantize_(model, GPTQConfig(group_size=32), progress=False)
    with pytest.raises(TypeError, match="quantization config"):
        quantize_(model, {"bits": 4})
    quantize_(model, NF4Config(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, RTNConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match="no Linear layer"):
        quantize_(nn.Sequential(nn.ReLU()), NF4Config(), progress=False)
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        config_from_dict({"quant_method": "awq", "bits": 4})


def test_older_entry_points_give_the_same_layers():
    """quantize_model and QuantConfig(method=...) are quantize_ and GPTQConfig / RTNConfig."""
    a, b = tiny_llama(), tiny_llama()
    quantize_model(a, CALIB, QuantConfig(bits=4, group_size=32), progress=False)
    quantize_(b, GPTQConfig(bits=4, group_size=32), CALIB, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    c, d = tiny_llama(), tiny_llama()
    quantize_linears_rtn(c, bits=4, group_size=32, progress=False)
    quantize_(d, RTNConfig(bits=4, group_size=32), progress=False)
    for (name, x), (_, y) in zip(c.state_dict().items(), d.state_dict().items()):
        assert torch.equal(x, y), name
    assert dataclasses.asdict(GPTQConfig(bits=3)) == dataclasses.asdict(QuantConfig(bits=3))
    assert GPTQConfig.from_dict(GPTQConfig(bits=3, group_size=64).to_dict()) == GPTQConfig(bits=3, group_size=64)
    assert type(config_from_dict(RTNConfig(bits=2).to_dict())) is RTNConfig


@pytest.mark.parametrize("method", ["rtn", "nf4", "int8"])
def test_gpt2_conv1d_checkpoints_load_back(method, tmp_path):
    model = tiny_gpt2()
    quantize_(model, config_for(method), progress=False)
    out = save_quantized(model, tmp_path / method)
    loaded = load_quantized(out)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, EXPECTED_LAYER[method])
    with torch.no_grad():
        expected = model(input_ids=CALIB[:2]).logits
        got = loaded(input_ids=CALIB[:2]).logits
    tol = 2e-2 if method == "rtn" else 0  # GPTQ-format checkpoints store the dense tensors in float16
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


class _StackOfLinears(nn.Module):
    """A model whose block list holds bare Linears (each block is the layer)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("config", [NF4Config(double_quant=False), Int8Config(threshold=0.0),
                                    RTNConfig(bits=8, group_size=32)], ids=["nf4", "int8", "rtn"])
def test_blocks_that_are_linears_are_replaced(config):
    torch.manual_seed(0)
    model = _StackOfLinears()
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
    quantize_(model, config, progress=False)
    assert [type(m) for m in model.layers] == [EXPECTED_LAYER[config.method]] * 3
    with torch.no_grad():
        after = model(x)
    # three layers' rounding compounds: NF4's 4 bits give ~0.1, int8 and 8-bit RTN ~0.01
    assert ((after - before).norm() / before.norm()).item() < (0.2 if config.method == "nf4" else 0.03)


def test_the_old_module_names_still_import():
    from lightllm.quantization.gptq_format import pack_gptq  # noqa: F401
    from lightllm.quantization.int8 import int8_vectorwise_quant  # noqa: F401
    from lightllm.quantization.model import LayerListNotFoundError, QuantConfig, find_blocks, quantize_model
    from lightllm.quantization.nf4 import QuantState  # noqa: F401
    import lightllm.quantization as q

    assert (QuantConfig, find_blocks, LayerListNotFoundError, quantize_model) == (
        q.QuantConfig, q.find_blocks, q.LayerListNotFoundError, q.quantize_model)
