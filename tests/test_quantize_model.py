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
from lightllm.quantization.core import quantization_units  # noqa: E402
from lightllm.quantization.gptq.calibrated import _sequential_groups, _capture_block_inputs  # noqa: E402

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
    elif family == "opt":
        m = t.OPTForCausalLM(t.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64))
    elif family == "gemma2":  # alternating sliding-window and full-attention layers
        m = t.Gemma2ForCausalLM(t.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, sliding_window=4))
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
    linears = quantization_units(model, QuantConfig())[1][0].linears
    inputs, block_args, _ = _capture_block_inputs(model, blocks, [{"input_ids": CALIB[:1]}])
    args, kwargs = block_args[0][0]
    with torch.no_grad():  # as in quantize_model: freed activations' ids get reused there
        groups = _sequential_groups(blocks[0], linears, lambda first_only=False: [blocks[0](inputs[0], *args, **kwargs)])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    opt = tiny("opt")
    _, blocks = find_blocks(opt)
    inputs, block_args, _ = _capture_block_inputs(opt, blocks, [{"input_ids": CALIB[:1]}])
    args, kwargs = block_args[0][0]
    with torch.no_grad():
        groups = _sequential_groups(blocks[0], quantization_units(opt, QuantConfig())[1][0].linears,
                                    lambda first_only=False: [blocks[0](inputs[0], *args, **kwargs)])
    assert groups == [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"],
                      ["fc1"], ["fc2"]] or groups[-2:] == [["fc1"], ["fc2"]]
    assert find_blocks(tiny("gpt2"))[0] == "transformer.h"
    assert find_blocks(tiny("bert"))[0] == "bert.encoder.layer"


def test_each_block_gets_its_own_arguments():
    # Gemma2 alternates sliding-window and full attention: block 1's mask is not block 0's.
    model = tiny("gemma2")
    _, blocks = find_blocks(model)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, k), with_kwargs=True)
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=CALIB[:2], use_cache=False)
    for h in hooks:
        h.remove()
    _, block_args, _ = _capture_block_inputs(model, blocks, [{"input_ids": CALIB[:2]}])
    masks = [block_args[i][0][1]["attention_mask"] for i in range(2)]
    assert torch.equal(masks[0], seen[0]["attention_mask"]) and torch.equal(masks[1], seen[1]["attention_mask"])
    assert not torch.equal(masks[0], masks[1])
    quantize_model(model, CALIB, QuantConfig(bits=4, group_size=32), progress=False)


def test_training_mode_dropout_is_off_while_quantizing():
    a, b = tiny("gpt2"), tiny("gpt2")  # GPT-2 has dropout 0.1 everywhere
    a.train()
    torch.manual_seed(1)
    quantize_model(a, CALIB, QuantConfig(bits=4, group_size=32), progress=False)
    torch.manual_seed(2)
    quantize_model(b, CALIB, QuantConfig(bits=4, group_size=32), progress=False)
    assert a.training and not b.training  # restored
    qa = [m.qweight for m in a.modules() if isinstance(m, QuantLinear)]
    qb = [m.qweight for m in b.modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(x, y) for x, y in zip(qa, qb))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_asymmetric_v1_never_needs_a_zero_of_zero(method, tmp_path):
    model = tiny("llama")
    with torch.no_grad():  # a group whose weights are all positive wants z = 0, which v1 cannot store
        model.model.layers[0].mlp.down_proj.weight[:, :32].abs_()
    config = QuantConfig(bits=4, group_size=32, sym=False, method=method)  # checkpoint_format "gptq" (v1)
    quantize_model(model, CALIB, config, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    from lightllm.quantization import unpack_gptq
    zeros = unpack_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, "gptq")["zeros"]
    assert int(zeros.min()) == 1 and int(zeros[0].min()) == 1
    out = save_quantized(model, tmp_path / "q", dtype=None)
    assert torch.equal(logits(load_quantized(out), CALIB[:2]), logits(model, CALIB[:2]))


def test_padding_stays_out_of_the_hessians(monkeypatch):
    # Right-padded batches with attention masks must give the Hessians of the unpadded sequences.
    # Compared on the first block's q/k/v (whose inputs are the embeddings): after a block is
    # quantized, float noise of 1e-8 between the padded and unpadded attention can flip rounding
    # decisions in GPTQ and the codes of later layers drift apart, so codes are not the thing to compare.
    from lightllm.quantization.gptq import calibrated as qmodel

    lengths = [24, 17, 9]
    padded = [{"input_ids": torch.cat([CALIB[i, :n], torch.zeros(24 - n, dtype=torch.long)])[None],
               "attention_mask": (torch.arange(24) < n).long()[None]} for i, n in enumerate(lengths)]
    unpadded = [{"input_ids": CALIB[i, :n][None]} for i, n in enumerate(lengths)]
    unmasked = [{"input_ids": p["input_ids"]} for p in padded]
    real_solve = qmodel.gptq_solve

    def first_hessian(batches):
        seen = []

        def spy(weight, hessian, *args, **kwargs):
            seen.append(hessian.clone())
            return real_solve(weight, hessian, *args, **kwargs)

        monkeypatch.setattr(qmodel, "gptq_solve", spy)
        quantize_model(tiny("llama"), batches, QuantConfig(bits=4, group_size=32), progress=False)
        return seen[0]  # block 0's first group

    want = first_hessian(unpadded)
    assert float((first_hessian(padded) - want).abs().max()) <= 1e-6 * float(want.abs().max())
    # and padding that were counted would change it: the same batches without their masks
    assert float((first_hessian(unmasked) - want).abs().max()) > 1e-3 * float(want.abs().max())


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


def test_asymmetric_checkpoints_keep_their_label(tmp_path):
    # Asymmetric zeros that happen to all equal 2**(bits-1) - 1 must not be "corrected" to v1/v2.
    model = tiny("llama")
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2",
                                            method="rtn"), progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qzeros.fill_(0x77777777)  # every true zero 7, stored as v2
    expected = logits(model, CALIB[:2])
    out = save_quantized(model, tmp_path / "q", dtype=None)
    assert torch.equal(logits(load_quantized(out), CALIB[:2]), expected)


def test_save_checks_the_config_and_the_destination(tmp_path):
    model = tiny("llama")
    quantize_model(model, None, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    with pytest.raises(ValueError, match="group_size=32, .* but the config says bits=4, group_size=64"):
        save_quantized(model, tmp_path / "q", config=QuantConfig(bits=4, group_size=64))
    with pytest.raises(ValueError, match="checkpoint_format='gptq' but the config says .*'gptq_v2'"):
        save_quantized(model, tmp_path / "q", config=QuantConfig(bits=4, group_size=32, checkpoint_format="gptq_v2"))
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "my_notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model checkpoint"):
        save_quantized(model, folder)
    assert (folder / "my_notes.md").read_text() == "mine"
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, CALIB, QuantConfig())


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
    with pytest.raises(TypeError, match="must be a quantization config"):
        quantize_model(tiny("llama"), CALIB, {"bits": 4})
    model = tiny("llama")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(model, pathlib.Path("/tmp/never-written"), config=QuantConfig())
