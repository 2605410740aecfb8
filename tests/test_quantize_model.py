"""Whole-model quantization and GPTQ checkpoints, on tiny random models of each family."""

import json
import logging
import pathlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lightllm.nn import QuantLinear  # noqa: E402
from lightllm.quantization import (  # noqa: E402
    CheckpointError,
    LayerListNotFoundError,
    QuantConfig,
    find_blocks,
    load_quantized,
    quantize_model,
    save_quantized,
)
from lightllm.quantization import checkpoint as ckpt  # noqa: E402
from lightllm.quantization.model import _sequential_groups, _block_linears, _capture_block_inputs  # noqa: E402

from test_gptq_format import spec_unpack_column  # noqa: E402

VOCAB = 96


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        m = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                             tie_word_embeddings=True, **common))
    elif family == "mistral":
        m = t.MistralForCausalLM(t.MistralConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **common))
    elif family == "qwen2":
        m = t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **common))
    elif family == "gpt2":
        m = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                           eos_token_id=0))
    elif family == "gpt_neox":
        m = t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=64, intermediate_size=96, **common))
    elif family == "bert":
        m = t.BertForMaskedLM(t.BertConfig(hidden_size=64, intermediate_size=96, **common))
    else:
        raise AssertionError(family)
    return m.eval()


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bert"]
CALIB = torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_load_gives_the_same_logits(family, tmp_path):
    model = tiny(family)
    before = logits(model, CALIB[:2])
    config = QuantConfig(bits=4, group_size=32, desc_act=family in ("llama", "gpt2"))
    quantize_model(model, CALIB, config, progress=False)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == {"llama": 14, "mistral": 14, "qwen2": 14, "gpt2": 8, "gpt_neox": 8, "bert": 12}[family]
    after = logits(model, CALIB[:2])
    assert 0 < (after - before).abs().max() < 0.25 * before.abs().max()  # changed, but still the model

    save_quantized(model, tmp_path / "q", dtype=None, max_shard_size=40_000)  # sharded on purpose
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.safetensors.index.json" in files and "quantize_config.json" in files
    loaded = load_quantized(tmp_path / "q", model_class=type(model))
    assert torch.equal(logits(loaded, CALIB[:2]), after)
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert quant["bits"] == 4 and quant["group_size"] == 32 and quant["quant_method"] == "gptq"
    assert quant["desc_act"] == config.desc_act and quant["checkpoint_format"] == "gptq"


def test_true_sequential_groups_follow_the_forward_pass():
    model = tiny("llama")
    name, blocks = find_blocks(model)
    assert name == "model.layers"
    linears = _block_linears(blocks[0], QuantConfig(), name)
    inputs, kwargs, _ = _capture_block_inputs(model, blocks[0], [{"input_ids": CALIB[:1]}])
    groups = _sequential_groups(blocks[0], linears,
                                lambda first_only=False: [blocks[0](inputs[0], *kwargs[0][0], **kwargs[0][1])])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert find_blocks(tiny("gpt2"))[0] == "transformer.h"
    assert find_blocks(tiny("bert"))[0] == "bert.encoder.layer"


def test_padding_stays_out_of_the_hessians():
    # Right-padded batches with attention masks must quantize as the unpadded sequences do.
    lengths = [24, 17, 9]
    padded = [{"input_ids": torch.cat([CALIB[i, :n], torch.zeros(24 - n, dtype=torch.long)])[None],
               "attention_mask": (torch.arange(24) < n).long()[None]} for i, n in enumerate(lengths)]
    unpadded = [{"input_ids": CALIB[i, :n][None]} for i, n in enumerate(lengths)]
    a, b = tiny("llama"), tiny("llama")
    quantize_model(a, padded, QuantConfig(bits=4, group_size=32), progress=False)
    quantize_model(b, unpadded, QuantConfig(bits=4, group_size=32), progress=False)
    qa = [m.qweight for m in a.modules() if isinstance(m, QuantLinear)]
    qb = [m.qweight for m in b.modules() if isinstance(m, QuantLinear)]
    same = sum(int((x == y).sum()) for x, y in zip(qa, qb)) / sum(x.numel() for x in qa)
    assert same > 0.99
    # and padding that were counted would change them: the same batches without their masks
    c = tiny("llama")
    quantize_model(c, [{"input_ids": p["input_ids"]} for p in padded], QuantConfig(bits=4, group_size=32), progress=False)
    qc = [m.qweight for m in c.modules() if isinstance(m, QuantLinear)]
    assert sum(int((x == y).sum()) for x, y in zip(qc, qb)) / sum(x.numel() for x in qc) < same


def test_rtn_method_and_default_float16_storage(tmp_path):
    model = tiny("qwen2")
    quantize_model(model, None, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "rtn")
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    loaded = load_quantized(out)
    assert isinstance(loaded, transformers.Qwen2ForCausalLM)
    torch.testing.assert_close(logits(loaded, CALIB[:2]), logits(model, CALIB[:2]), rtol=0, atol=2e-2)


def test_checkpoint_tensors_follow_the_spec(tmp_path):
    """Decode a saved layer with the spec's unpacker (test_gptq_format) and compare with the module."""
    model = tiny("llama")
    quantize_model(model, CALIB, QuantConfig(bits=3, group_size=32, sym=False, desc_act=True,
                                             checkpoint_format="gptq_v2"), progress=False)
    layer = model.model.layers[1].mlp.down_proj
    out = save_quantized(model, tmp_path / "q")
    t = load_file(out / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj."
    qweight, qzeros, scales, g_idx = (t[prefix + n] for n in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = 96, 64
    q = torch.tensor([spec_unpack_column(qweight[:, j].tolist(), 3) for j in range(n)]).t()  # [K, N]
    z = torch.tensor([spec_unpack_column(qzeros[g].tolist(), 3) for g in range(qzeros.shape[0])])  # v2: true z
    w = (scales.float()[g_idx.long()] * (q - z[g_idx.long()]).float()).t()
    assert q.shape == (k, n)
    torch.testing.assert_close(w, layer.dequantize(torch.float32), rtol=0, atol=0)
    assert not torch.equal(g_idx.long(), torch.arange(k) // 32)  # act-order g_idx in checkpoint order


def test_autogptq_file_names_and_mislabelled_zero_convention(tmp_path, caplog):
    model = tiny("llama")
    quantize_model(model, CALIB, QuantConfig(bits=4, group_size=32, checkpoint_format="gptq_v2"), progress=False)
    expected = logits(model, CALIB[:2])
    out = save_quantized(model, tmp_path / "q", dtype=None)
    # AutoGPTQ's layout: weights under model_file_base_name, the config only in quantize_config.json,
    # and (a real-world mistake) the v2 tensors labelled as v1.
    (out / "model.safetensors").rename(out / "gptq_model-4bit-32g.safetensors")
    config = json.loads((out / "config.json").read_text())
    quant = config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    quant.update(model_file_base_name="gptq_model-4bit-32g", checkpoint_format="gptq")
    (out / "quantize_config.json").write_text(json.dumps(quant))
    with caplog.at_level(logging.WARNING, logger="lightllm"):
        loaded = load_quantized(out)
    assert "zeros say checkpoint_format='gptq_v2'" in caplog.text
    assert torch.equal(logits(loaded, CALIB[:2]), expected)


def test_unreadable_checkpoints_give_errors_that_name_the_problem(tmp_path):
    model = tiny("llama")
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())

    def with_quant(**changes):
        c = json.loads(json.dumps(config))
        c["quantization_config"].update(changes)
        (out / "config.json").write_text(json.dumps(c))

    with_quant(checkpoint_format="marlin")
    with pytest.raises(CheckpointError, match="checkpoint_format 'marlin' is not supported"):
        load_quantized(out)
    with_quant(quant_method="awq")
    with pytest.raises(CheckpointError, match="quant_method 'awq' is not supported"):
        load_quantized(out)
    with_quant(bits=5)
    with pytest.raises(CheckpointError, match="bits=5"):
        load_quantized(out)
    with_quant()
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantized(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_quantized(out)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_missing_shard_and_missing_tensor(tmp_path):
    model = tiny("gpt2")
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "q", max_shard_size=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        load_quantized(out)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    with pytest.raises(CheckpointError, match="lacks"):
        load_quantized(out)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny("llama")
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_write(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_json", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no half-written directory left behind


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="awq")
    with pytest.raises(LayerListNotFoundError, match="cannot find the transformer blocks of Sequential"):
        quantize_model(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), CALIB, QuantConfig())
    with pytest.raises(ValueError, match="LongTensor of token ids"):
        quantize_model(tiny("llama"), torch.randn(4, 8), QuantConfig())
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_model(tiny("llama"), CALIB, {"bits": 4})
    model = tiny("llama")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(model, pathlib.Path("/tmp/never-written"), config=QuantConfig())
