"""Bottleneck adapters: placements against formulas written here, every base kind, named adapters,
LLM-Adapters' and AdapterHub's files (fixtures made by the real `adapters` library), bad files,
LLM-Adapters' quirks not copied, and training on the embedded model."""

import json
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightllm  # noqa: E402
from lightllm.nn import QuantLinear  # noqa: E402
from lightllm.tuning import (AdapterConfig, AdapterLayer, AdapterModel, LoraConfig, from_pretrained,  # noqa: E402
                             get_peft_model)

from conftest import cpu_backends  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "adapterhub"
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
BACKENDS = [b for b in cpu_backends() if b != "cpp"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapters(wrapped, seed=1, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".adapter_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "adapter_scaling" in name else 0.0))


def act_fn(name):
    return (lambda t: torch.nn.functional.leaky_relu(t, 0.01)) if name == "leakyrelu" else \
        transformers.activations.ACT2FN[name]


# ---- the config: LLM-Adapters' fields, presets, quirks -----------------------------------------

def test_default_config_is_llm_adapters_and_writes_their_keys():
    c = AdapterConfig()
    assert (c.bottleneck_size, c.non_linearity, c.adapter_dropout, c.target_modules, c.use_parallel_adapter,
            c.use_adapterp, c.scaling, c.bias, c.init_weights, c.modules_to_save, c.peft_type) == \
        (256, "tanh", 0.0, None, False, False, 1.0, "none", "bert", None, "BOTTLENECK")
    # LLM-Adapters' BottleneckConfig + PeftConfig keys, nothing more, for a default config
    assert set(c.to_dict()) == {"bottleneck_size", "non_linearity", "adapter_dropout", "target_modules",
                                "use_parallel_adapter", "use_adapterp", "scaling", "bias", "init_weights",
                                "modules_to_save", "task_type", "base_model_name_or_path", "inference_mode",
                                "peft_type"}
    assert "placement" in AdapterConfig(placement="output").to_dict()


def test_integer_scaling_works_llm_adapters_quirk_1():
    """LLM-Adapters accepts only isinstance(scaling, float): an int (fire parses `--scaling 1` so)
    leaves the layer without a scaling and its forward pass raises AttributeError."""
    c = AdapterConfig(scaling=2, bottleneck_size=4, target_modules=["down_proj"])
    assert c.scaling == 2.0 and isinstance(c.scaling, float)
    wrapped = get_peft_model(tiny_llama(), c)
    randomize_adapters(wrapped)
    assert torch.isfinite(logits(wrapped)).all()


def test_config_rules():
    with pytest.raises(ValueError, match="scaling must be a number or 'learned'"):
        AdapterConfig(scaling="channel")
    with pytest.raises(ValueError, match="bottleneck_size must be an integer >= 1"):
        AdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        AdapterConfig(placement="after")
    with pytest.raises(ValueError, match="non_linearity 'swoosh' is not one of transformers' ACT2FN"):
        AdapterConfig(non_linearity="swoosh")
    with pytest.raises(ValueError, match="bias must be 'none', 'all' or 'adapter_only'"):
        AdapterConfig(bias="lora_only")
    with pytest.raises(ValueError, match="use_parallel_adapter=True contradicts placement='mh'"):
        AdapterConfig(use_parallel_adapter=True, placement="mh")
    h = AdapterConfig.from_preset("houlsby")
    assert (h.placement, h.non_linearity, h.reduction_factor, h.adapter_bias) == ("output", "swish", 16, True)
    p = AdapterConfig.from_preset("parallel", scaling="learned")
    assert (p.placement, p.reduction_factor, p.init_weights, p.scaling) == \
        ("parallel_residual", 2, "mam_adapter", "learned")
    assert AdapterConfig.from_dict(h.to_dict()) == h


def test_llm_adapters_default_targets_and_placements():
    """AdapterH: gate/up_proj mh, down_proj output; AdapterP: down_proj; parallel: q, k, v."""
    cases = [(AdapterConfig(bottleneck_size=8), {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"}),
             (AdapterConfig(bottleneck_size=8, use_adapterp=True), {"down_proj": "output"}),
             (AdapterConfig(bottleneck_size=8, use_parallel_adapter=True),
              {"q_proj": "parallel", "k_proj": "parallel", "v_proj": "parallel"})]
    for config, want in cases:
        wrapped = get_peft_model(tiny_llama(), config)
        got = {n.rpartition(".")[2]: layer.settings["default"].placement for n, layer in wrapped.adapter_layers().items()}
        assert got == want and len(wrapped.adapter_layers()) == 2 * len(want)


def test_the_wrapper_keeps_the_base_layer_s_sizes_llm_adapters_quirk_2():
    """LLM-Adapters builds an mh wrapper as Linear(in, in) and an output wrapper as Linear(out, out):
    wrong in_features / out_features. Ours report the base layer's, and its weight is untouched."""
    model = tiny_llama()
    gate_before = model.model.layers[0].mlp.gate_proj.weight.clone()
    wrapped = get_peft_model(model, AdapterConfig(bottleneck_size=8))
    for layer in wrapped.adapter_layers().values():
        assert (layer.in_features, layer.out_features) == (layer.base_layer.in_features, layer.base_layer.out_features)
    gate = wrapped.model.model.layers[0].mlp.gate_proj
    assert (gate.in_features, gate.out_features) == (64, 96)
    assert torch.equal(gate.base_layer.weight, gate_before)


def test_the_base_layer_runs_once_per_call_llm_adapters_quirk_3():
    """LLM-Adapters' 8-bit mh adapter runs the base GEMM twice (once on x, once on the adapted x)."""
    layer = AdapterLayer(torch.nn.Linear(16, 8))
    layer.add_adapter("default", "mh", 4)
    calls = []
    layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    layer(torch.randn(3, 16))
    assert calls == [1]


# ---- the placements against their formulas, on every base kind ---------------------------------

def _base(kind, k, n, dtype):
    torch.manual_seed(3)
    if kind == "linear":
        return torch.nn.Linear(k, n).to(dtype)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(n, k)
        torch.nn.init.normal_(layer.weight, std=k ** -0.5)
        return layer.to(dtype)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n), 4, 32, sym=False)
    return q.to(dtype=dtype) if dtype != torch.float32 else q


def _dense(base):
    if isinstance(base, QuantLinear):
        return base.dequantize(torch.float64), (None if base.bias is None else base.bias.double())
    w = base.weight.detach().double()
    return (w.t() if type(base).__name__ == "Conv1D" else w), base.bias.detach().double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "quant"])
@pytest.mark.parametrize("placement", ["mh", "output", "parallel", "output_residual", "parallel_residual"])
@pytest.mark.parametrize("dtype,tokens", [(torch.float32, (2, 7)), (torch.float16, (1,)), (torch.bfloat16, (3, 5))])
def test_placement_matches_its_formula(backend, kind, placement, dtype, tokens):
    if dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("the Triton interpreter computes bf16 wrongly (bf16 runs on the GPU tests)")
    k, n = (96, 96) if placement in ("mh",) else (96, 64)
    layer = AdapterLayer(_base(kind, k, n, dtype))
    layer.add_adapter("default", placement, 7, "silu", "learned", bias=True, init_weights="bert")
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    randomize_adapters(layer)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*tokens, k, generator=gen).to(dtype).requires_grad_()
    r = torch.randn(*tokens, n, generator=gen).to(dtype)
    if placement.endswith("_residual"):
        layer._residual = r  # what the norm's pre-hook captures in a model
    with lightllm.use_backend(backend):
        y = layer(x)
    grad = torch.randn(y.shape, generator=gen).to(dtype)
    params = [x, layer.adapter_down["default"].weight, layer.adapter_up["default"].weight,
              layer.adapter_down["default"].bias, layer.adapter_scaling["default"]]
    got = torch.autograd.grad(y, params, grad)

    w, b = _dense(layer.base_layer)
    x64, wd, wu, bd, s = (t.detach().double().requires_grad_() for t in params)
    bu = layer.adapter_up["default"].bias.detach().double()
    r64 = r.double()

    def A(z):
        return s * (act_fn("silu")(z @ wd.t() + bd) @ wu.t() + bu)

    def base(t):
        return t @ w.t() + (0 if b is None else b)

    o = base(x64)
    want = {"mh": lambda: base(x64 + A(x64)), "output": lambda: o + A(o), "parallel": lambda: o + A(x64),
            "output_residual": lambda: o + A(o + r64), "parallel_residual": lambda: o + A(r64)}[placement]()
    expected = torch.autograd.grad(want, [x64, wd, wu, bd, s], grad.double())
    eps = torch.finfo(dtype).eps
    # the base layer's own rounding (its output in dtype) feeds the adapter: a few roundings of the output
    tol = (4 if dtype == torch.float32 else 16) * eps
    assert y.dtype == dtype and y.shape == (*tokens, n)
    assert (y.double() - want).abs().max() <= tol * max(want.abs().max().item(), 1.0)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g.double() - e).abs().max() <= 8 * tol * max(e.abs().max().item(), 1.0), i


def test_presets_in_a_model_match_hooks_written_from_the_formulas():
    """On a tiny LLaMA: Houlsby (o + A(o) after o_proj and down_proj), Pfeiffer (o + A(o + r) after
    down_proj) and He et al.'s parallel adapter (o + A(r) beside the FFN), with r the residual
    stream, against the plain model with forward hooks doing the same."""
    for preset in ("houlsby", "pfeiffer", "parallel"):
        wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset(preset))
        randomize_adapters(wrapped)
        got = logits(wrapped)
        plain = tiny_llama()
        for name, layer in wrapped.adapter_layers().items():
            s = layer.settings["default"]
            down, up = layer.adapter_down["default"], layer.adapter_up["default"]
            decoder = plain.get_submodule(name.rsplit(".", 2)[0])
            norm = decoder.input_layernorm if "self_attn" in name else decoder.post_attention_layernorm
            store = {}
            norm.register_forward_pre_hook(lambda m, a, store=store: store.__setitem__("r", a[0]))

            def hook(m, a, o, down=down, up=up, s=s, store=store):
                z = {"output": o, "output_residual": o + store["r"], "parallel_residual": store["r"]}[s.placement]
                return o + s.scaling * up(act_fn(s.non_linearity)(down(z)))

            plain.get_submodule(name).register_forward_hook(hook)
        want = logits(plain)
        assert (got - want).abs().max() <= 1e-5, preset
        assert (got - logits(tiny_llama())).abs().max() > 1e-2, preset  # the adapters do something


def test_gpt2_conv1d_model_takes_every_preset_and_llm_adapters_default():
    for config in (AdapterConfig.from_preset("houlsby"), AdapterConfig.from_preset("pfeiffer"),
                   AdapterConfig(bottleneck_size=8)):
        wrapped = get_peft_model(tiny_gpt2(), config)
        randomize_adapters(wrapped)
        out = logits(wrapped, IDS[:, :8])
        assert torch.isfinite(out).all() and (out - logits(tiny_gpt2(), IDS[:, :8])).abs().max() > 1e-3


def test_a_quantized_base_model_trains_with_adapters_and_the_base_stays_frozen():
    from lightllm.quantization import QuantConfig, quantize_model

    model = tiny_llama()
    quantize_model(model, IDS, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    wrapped = get_peft_model(model, AdapterConfig.from_preset("houlsby", init_weights="mam_adapter"))
    base_state = {k: v.clone() for k, v in wrapped.get_base_model().state_dict().items() if "adapter_" not in k}
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        loss = wrapped(input_ids=IDS, labels=IDS).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    after = wrapped.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())


# ---- named adapters, disabling, merging -----------------------------------------------------------

def test_named_adapters_switch_disable_delete_and_refuse_to_merge():
    base_logits = logits(tiny_llama())
    wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset("houlsby"))
    wrapped.add_adapter("other", AdapterConfig(bottleneck_size=4, target_modules=["down_proj"]))
    randomize_adapters(wrapped)
    first = logits(wrapped)
    wrapped.set_adapter("other")
    second = logits(wrapped)
    assert (first - second).abs().max() > 1e-3
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    with wrapped.disable_adapter():
        torch.testing.assert_close(logits(wrapped), base_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nonlinearity between their two projections.*cannot be merged"):
        wrapped.merge_and_unload()
    wrapped.delete_adapter("other")
    assert wrapped.active_adapter == "default"
    torch.testing.assert_close(logits(wrapped), first, rtol=0, atol=0)
    norm = wrapped.model.model.layers[0].post_attention_layernorm
    plain = wrapped.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules()) and not norm._forward_pre_hooks
    torch.testing.assert_close(logits(plain), base_logits, rtol=0, atol=0)


def test_residual_hooks_are_removed_with_the_last_adapter_that_needs_them():
    wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset("pfeiffer"))
    norm = wrapped.model.model.layers[0].post_attention_layernorm
    assert len(norm._forward_pre_hooks) == 1
    wrapped.add_adapter("plain", AdapterConfig(bottleneck_size=4, target_modules=["down_proj"], placement="output"))
    wrapped.delete_adapter("default")
    assert len(norm._forward_pre_hooks) == 0
    assert torch.isfinite(logits(wrapped)).all()


def test_trainable_parameters_count_quantized_layers_at_their_logical_size(capsys):
    from lightllm.quantization import QuantConfig, quantize_model

    dense_total = sum(p.numel() for p in tiny_llama().parameters())
    model = tiny_llama()
    quantize_model(model, IDS, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    wrapped = get_peft_model(model, AdapterConfig(bottleneck_size=8, target_modules=["down_proj"], placement="output"))
    trainable, total = wrapped.get_nb_trainable_parameters()
    assert trainable == 2 * (2 * 64 * 8)
    assert total == dense_total + trainable  # the packed layers count as in x out (+ bias), like the dense ones
    wrapped.print_trainable_parameters()
    assert "quantized layers counted at their logical size" in capsys.readouterr().out


def test_a_wrapped_model_compiles():
    wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset("pfeiffer"))
    randomize_adapters(wrapped)
    eager = logits(wrapped)
    compiled = torch.compile(wrapped, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, eager, rtol=1e-5, atol=1e-5)


# ---- LLM-Adapters' files ------------------------------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False])
def test_llm_adapters_files_round_trip(tmp_path, safe):
    wrapped = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=8, scaling="learned"))
    randomize_adapters(wrapped)
    want = logits(wrapped)
    wrapped.save_pretrained(tmp_path, safe_serialization=safe)
    weights = tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter_config.json", weights.name])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    loaded = from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded, AdapterModel)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_checkpoint_written_as_llm_adapters_writes_it_loads(tmp_path):
    """Written here from the format (torch.save of a dict; keys base_model.model.<module>.adapter_down
    .weight / .adapter_up.weight; no adapter name; peft_type BOTTLENECK) as their fork's
    save_pretrained does, then compared with the formulas: output adapter on down_proj
    (h + s up(tanh(down(h)))) and mh adapters on gate/up_proj (W(x + s up(tanh(down(x)))))."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for i in range(2):
        for module, width in (("gate_proj", 64), ("up_proj", 64), ("down_proj", 64)):
            prefix = f"base_model.model.model.layers.{i}.mlp.{module}."
            tensors[prefix + "adapter_down.weight"] = torch.randn(16, width, generator=gen) * 0.2
            tensors[prefix + "adapter_up.weight"] = torch.randn(width, 16, generator=gen) * 0.2
    torch.save(tensors, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "adapter_dropout": 0.05, "base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none", "bottleneck_size": 16,
        "inference_mode": True, "init_weights": "bert", "modules_to_save": None, "non_linearity": "tanh",
        "peft_type": "BOTTLENECK", "scaling": 1.0, "target_modules": ["down_proj", "up_proj", "gate_proj"],
        "task_type": "CAUSAL_LM", "use_adapterp": False, "use_parallel_adapter": False}, indent=2, sort_keys=True))
    loaded = from_pretrained(tiny_llama(), tmp_path)
    plain = tiny_llama()
    for i in range(2):
        for module in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"base_model.model.model.layers.{i}.mlp.{module}."
            down, up = tensors[prefix + "adapter_down.weight"], tensors[prefix + "adapter_up.weight"]
            target = plain.get_submodule(f"model.layers.{i}.mlp.{module}")
            if module == "down_proj":
                target.register_forward_hook(lambda m, a, o, d=down, u=up: o + torch.tanh(o @ d.t()) @ u.t())
            else:
                target.register_forward_pre_hook(lambda m, a, d=down, u=up: (a[0] + torch.tanh(a[0] @ d.t()) @ u.t(),))
    torch.testing.assert_close(logits(loaded), logits(plain), rtol=1e-5, atol=1e-5)


# ---- AdapterHub's files (fixtures made with the `adapters` library: fixtures/adapterhub/) ---------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"])
def test_adapterhub_adapters_reproduce_the_libraries_logits(backend, name):
    from safetensors.torch import load_file

    expected = load_file(FIXTURES / name / "expected.safetensors")
    model = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32).eval()
    wrapped = from_pretrained(model, FIXTURES / name)
    with lightllm.use_backend(backend):
        got = logits(wrapped, expected["input_ids"])
    torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("folder", sorted(p.name for p in (FIXTURES / "ours").iterdir()))
def test_our_adapterhub_files_read_back(folder):
    """The files lightllm wrote in AdapterHub's format (the `adapters` library read the same files
    and reproduced these logits: make_fixtures.py check-ours, README)."""
    from safetensors.torch import load_file

    expected = load_file(FIXTURES / "ours" / folder / "lightllm_logits.safetensors")
    model = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32).eval()
    got = logits(from_pretrained(model, FIXTURES / "ours" / folder), expected["input_ids"])
    torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-5)


def test_adapterhub_round_trip_and_what_it_cannot_express(tmp_path):
    wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset("parallel", scaling="learned"))
    randomize_adapters(wrapped)
    wrapped.save_pretrained(tmp_path / "hub", format="adapterhub")
    raw = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert raw["config"]["is_parallel"] is True and raw["config"]["reduction_factor"] == 2 and raw["name"] == "default"
    torch.testing.assert_close(logits(from_pretrained(tiny_llama(), tmp_path / "hub")), logits(wrapped), rtol=0, atol=0)
    mh = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="AdapterHub places adapters on sublayer outputs"):
        mh.save_pretrained(tmp_path / "no", format="adapterhub")
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())


# ---- bad files change nothing -------------------------------------------------------------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_files_raise_clear_errors_and_leave_the_model_as_it_was(tmp_path):
    wrapped = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=8, target_modules=["down_proj"],
                                                         placement="output"))
    wrapped.save_pretrained(tmp_path / "good")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.adapter_up.weight"
    bad = dict(tensors, **{key: torch.zeros(64, 9)})
    (tmp_path / "shape").mkdir()
    save_file(bad, tmp_path / "shape" / "adapter_model.safetensors")
    (tmp_path / "shape" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"adapter_up.weight has shape \(64, 9\) but model.layers.1.mlp.down_proj "
                                         r"needs \(64, 8\)"):
        from_pretrained(model, tmp_path / "shape")
    extra = dict(tensors, **{"base_model.model.model.layers.0.mlp.up_proj.adapter_up.weight": torch.zeros(3, 3)})
    (tmp_path / "extra").mkdir()
    save_file(extra, tmp_path / "extra" / "adapter_model.safetensors")
    (tmp_path / "extra" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="up_proj.adapter_up.weight names a module the model has no adapter on"):
        from_pretrained(model, tmp_path / "extra")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / "trunc" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="could not be read as a tensor file"):
        from_pretrained(model, tmp_path / "trunc")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # AdapterHub options with other math are refused by name
    hub = tmp_path / "hub"
    hub.mkdir()
    raw = json.loads((FIXTURES / "seq_bn" / "adapter_config.json").read_text())
    raw["config"]["ln_after"] = True
    (hub / "adapter_config.json").write_text(json.dumps(raw))
    (hub / "pytorch_adapter.bin").write_bytes((FIXTURES / "seq_bn" / "pytorch_adapter.bin").read_bytes())
    with pytest.raises(ValueError, match="AdapterHub option ln_after=True is not supported"):
        from_pretrained(model, hub)
    # files for other models: another width, another architecture
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"self_attn.o_proj.adapter_down.\w+ has shape \(4.*\) but "
                                         r"model.layers.0.self_attn.o_proj needs \(5"):
        from_pretrained(wider, FIXTURES / "double_seq_bn")
    with pytest.raises(ValueError, match=r"target_modules=\['self_attn.o_proj', 'mlp.down_proj'\] matches no Linear"):
        from_pretrained(tiny_gpt2(), FIXTURES / "double_seq_bn")


def test_loading_into_an_existing_adapter_checks_first(tmp_path):
    wrapped = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=8, target_modules=["down_proj"],
                                                         placement="output"))
    randomize_adapters(wrapped)
    wrapped.save_pretrained(tmp_path)
    other = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=8, target_modules=["up_proj"], placement="mh"))
    before = _state(other)
    with pytest.raises(ValueError, match="puts an adapter on model.layers.0.mlp.down_proj, where adapter 'default' has none"):
        other.load_adapter(tmp_path, "default")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    torch.testing.assert_close(logits(other), logits(wrapped), rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter type 'BOTTLENECK' is not LORA"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).load_adapter(tmp_path, "default")


# ---- the shared base: registry and k-bit preparation ----------------------------------------------

def test_a_registered_base_layer_is_wrapped_by_every_method():
    from lightllm.tuning import BaseLayerKind, register_base_layer
    from lightllm.tuning import layers as tuning_layers

    class MyLinear(torch.nn.Module):  # a base layer of a kind lightllm has never seen
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 10))

        def forward(self, x):
            return x @ self.w.t()

    class Host(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = MyLinear()

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="wraps nn.Linear"):
        get_peft_model(Host(), LoraConfig(target_modules=["proj"]))
    kind = register_base_layer(BaseLayerKind(name="MyLinear", matches=lambda m: isinstance(m, MyLinear),
                                             features=lambda m: (10, 6), reference=lambda m: m.w,
                                             dense_weight=lambda m: m.w))
    try:
        x = torch.randn(3, 10)
        lora = get_peft_model(Host(), LoraConfig(target_modules=["proj"], init_lora_weights=False))
        adapter = get_peft_model(Host(), AdapterConfig(bottleneck_size=2, target_modules=["proj"], placement="output"))
        assert lora(x).shape == adapter(x).shape == (3, 6)
    finally:
        tuning_layers._KINDS.remove(kind)


def test_prepare_model_for_kbit_training_on_a_quantized_model():
    from lightllm.quantization import QuantConfig, quantize_model
    from lightllm.tuning import prepare_model_for_kbit_training

    def build():
        model = tiny_llama().half()
        quantize_model(model, IDS, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
        return model

    model = prepare_model_for_kbit_training(build())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.scales.dtype == torch.float16  # the packed layer is untouched
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    grads = []
    for checkpointing in (True, False):
        m = prepare_model_for_kbit_training(build(), use_gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        # Pfeiffer reads the residual stream through a hook on the norm: recomputation must capture it again
        wrapped = get_peft_model(m, AdapterConfig.from_preset("pfeiffer", init_weights="houlsby"))
        wrapped.train()
        wrapped(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


# ---- it trains ----------------------------------------------------------------------------------------

PLACEMENTS = {
    "series (LLM-Adapters: mh + output)": AdapterConfig(bottleneck_size=32),
    "AdapterP (output on down_proj)": AdapterConfig(bottleneck_size=32, use_adapterp=True),
    "parallel (LLM-Adapters, q/k/v)": AdapterConfig(bottleneck_size=32, use_parallel_adapter=True),
    "Houlsby": AdapterConfig.from_preset("houlsby"),
    "Pfeiffer (output_residual)": AdapterConfig.from_preset("pfeiffer"),
    "parallel (He et al., parallel_residual)": AdapterConfig.from_preset("parallel"),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_each_placement_learns_on_the_embedded_model(name, capsys):
    """40 steps of 4 x 128 tokens of Macbeth's first 85% with AdamW8bit: the loss falls and the
    perplexity of the last 15% (held out, the same play) improves by at least 10%."""
    import copy

    from lightllm import data
    from lightllm.eval import perplexity, tokenize_stream
    from lightllm.models import load_model
    from lightllm.optim import AdamW8bit

    play = data.shakespeare_text("heldout")
    play = play[: len(play) // 2]
    cut = int(len(play) * 0.85)
    model, tokenizer = load_model(device="cpu")
    torch.manual_seed(0)
    wrapped = get_peft_model(model, copy.deepcopy(PLACEMENTS[name]))
    wrapped.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    wrapped.eval()
    before = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False)
    opt = AdamW8bit([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    ids = tokenize_stream(tokenizer, play[:cut])
    wrapped.train()
    losses = []
    for batch in data.calibration_samples(ids, 160, 128, seed=1).view(40, 4, 128):
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    wrapped.eval()
    after = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False)
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.5, losses
    assert after < 0.9 * before, (before, after)


# ---- GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_presets_on_the_gpu_match_the_reference(dtype):
    if not lightllm.backends.has_kernel("bottleneck_adapter", "triton", "cuda"):
        pytest.skip("no triton kernel here")
    for preset in ("houlsby", "pfeiffer", "parallel"):
        wrapped = get_peft_model(tiny_llama(), AdapterConfig.from_preset(preset))
        randomize_adapters(wrapped)
        wrapped.to("cuda", dtype)
        ids = IDS.cuda()
        with lightllm.use_backend("torch"):
            want = logits(wrapped, ids)
        with lightllm.use_backend("triton"):
            got = logits(wrapped, ids)
        scale = want.abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= 16 * torch.finfo(dtype).eps * scale, preset


# ---- review findings, each pinned -----------------------------------------------------------------

def test_wrapped_models_pickle_whole(tmp_path):
    """torch.save of a whole wrapped model (LoRA or adapters) works and loads back the same."""
    for config in (LoraConfig(target_modules=["q_proj"], init_lora_weights=False), AdapterConfig.from_preset("pfeiffer")):
        wrapped = get_peft_model(tiny_llama(), config)
        randomize_adapters(wrapped)
        torch.save(wrapped, tmp_path / "model.pt")
        again = torch.load(tmp_path / "model.pt", weights_only=False)
        torch.testing.assert_close(logits(again), logits(wrapped), rtol=0, atol=0)


def test_saved_modules_with_integer_buffers_and_configs_without_peft_type_load(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.proj(x))

    wrapped = get_peft_model(Net(), LoraConfig(target_modules=["proj"], modules_to_save=["bn"]))
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["peft_type"]  # older files: LoRA
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = from_pretrained(Net(), tmp_path)  # num_batches_tracked is int64: not an adapter weight
    assert type(loaded).__name__ == "LoraModel"


def test_loading_a_file_into_an_existing_adapter_with_other_settings_is_refused(tmp_path):
    saved = get_peft_model(tiny_llama(), AdapterConfig.from_preset("pfeiffer", scaling=3.0))
    saved.save_pretrained(tmp_path)
    other = get_peft_model(tiny_llama(), AdapterConfig.from_preset("houlsby", non_linearity="relu"))
    with pytest.raises(ValueError, match=r"differs from adapter 'default' in placement \(the adapter's 'output', the file's 'output_residual'\), "
                                         r"scaling \(the adapter's 1.0, the file's 3.0\)"):
        other.load_adapter(tmp_path, "default")


def test_float64_models_and_re_added_adapters():
    wrapped = get_peft_model(tiny_llama().double(), AdapterConfig.from_preset("houlsby"))
    randomize_adapters(wrapped)
    assert logits(wrapped).dtype == torch.float64  # the op takes float32/16/bf16; float64 runs module by module
    layer = AdapterLayer(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    layer.add_adapter("a", "output", 4, "relu", 1.0, init_weights="bert")
    one = layer(x)
    layer.delete_adapter("a")
    layer.add_adapter("a", "output", 4, "relu", 3.0, init_weights="bert")
    with torch.no_grad():
        layer.adapter_down["a"].weight.fill_(0.1)
        layer.adapter_up["a"].weight.fill_(0.1)
        o = layer.base_layer(x)
        want = o + 3.0 * torch.relu(o @ layer.adapter_down["a"].weight.t()) @ layer.adapter_up["a"].weight.t()
    torch.testing.assert_close(layer(x).detach(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(one, layer(x))


def test_trained_base_biases_use_llm_adapters_names(tmp_path):
    wrapped = get_peft_model(tiny_gpt2(), AdapterConfig(bottleneck_size=4, bias="adapter_only"))
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained and all(".base_layer.bias" in n for n in trained)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if n in trained:
                p.add_(0.5)
    wrapped.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.mlp.c_proj.bias" in keys and not any(".base_layer." in k for k in keys)
    torch.testing.assert_close(logits(from_pretrained(tiny_gpt2(), tmp_path), IDS[:, :8]), logits(wrapped, IDS[:, :8]),
                               rtol=0, atol=0)


def test_a_preset_needs_its_sublayers():
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ValueError, match="preset 'pfeiffer' finds its targets for model types"):
        get_peft_model(model, AdapterConfig.from_preset("pfeiffer"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["tanh", "gelu_new", "relu", "sigmoid"])
def test_fixed_scaling_and_other_activations_through_the_layer(backend, act):
    layer = AdapterLayer(torch.nn.Linear(40, 24))
    layer.add_adapter("default", "parallel", 5, act, 0.5, init_weights="bert")
    randomize_adapters(layer)
    x = torch.randn(2, 9, 40, requires_grad=True)
    with lightllm.use_backend(backend):
        y = layer(x)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    x64 = x.detach().double().requires_grad_()
    d, u = layer.adapter_down["default"].weight.double(), layer.adapter_up["default"].weight.double()
    base = layer.base_layer
    want = torch.nn.functional.linear(x64, base.weight.double(), base.bias.double()) + \
        0.5 * act_fn(act)(x64 @ d.t()) @ u.t()
    (ex,) = torch.autograd.grad(want.sum(), [x64])
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), ex, rtol=1e-5, atol=1e-5)
