"""Prefix tuning, prompt tuning and P-tuning: configs derived as PEFT derives them (GQA, explicit
head_dim), generate() against step-by-step forwards on six model families, PEFT's files both ways
against the real peft, gradient checkpointing, stacking with LoRA, quantized bases, bad input, and
training on the embedded model."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightllm.tuning import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptLearningModel,  # noqa: E402
                             PromptTuningConfig, from_pretrained, get_peft_model)

P = 5


def tiny(family: str, seed: int = 0):
    """A tiny random causal LM of a family, built from its config."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  pad_token_id=0, max_position_embeddings=64)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    elif family == "qwen3":  # q/k norms; head_dim 32, not hidden / heads = 16
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=32, **common))
    elif family == "gemma":  # one key/value head of an explicit head_dim 24
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=1, head_dim=24, **common))
    elif family == "mistral":  # a sliding window shorter than prefix + prompt + new tokens
        model = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=8,
                                                                           **common))
    elif family == "gpt2":  # Conv1D, no GQA, learned positions
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "mistral", "gpt2"]
METHODS = {
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=P),
    "prefix-mlp": lambda: PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=32),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=P),
    "p-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=32),
    "p-tuning-lstm": lambda: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                 encoder_reparameterization_type="LSTM"),
}


def batch(seed=0, pad=3):
    """Two prompts of 7 tokens, the second left-padded by ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


def randomized(wrapped, seed=1, std=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return wrapped


def greedy_by_forwards(model, ids, mask, steps):
    """Greedy decoding by full forward passes, no cache: the oracle for generate()."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


# ---- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,token_dim,heads", [("llama", 32, 2), ("qwen3", 64, 2), ("gemma", 24, 1),
                                                    ("gpt2", 64, 4)])
def test_prefix_dims_are_derived_as_peft_derives_them(family, token_dim, heads):
    """GQA: token_dim = head_dim * num_key_value_heads, heads = num_key_value_heads; an explicit
    head_dim wins over hidden / heads; encoder_hidden_size defaults to token_dim."""
    wrapped = get_peft_model(tiny(family), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
    c = wrapped.peft_config["default"]
    assert (c.num_layers, c.token_dim, c.num_attention_heads, c.encoder_hidden_size) == (2, token_dim, heads, token_dim)
    assert wrapped.prompt_encoder["default"]().shape == (P, 2 * 2 * token_dim)
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny(family), peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"))
    pc = theirs.peft_config["default"]
    assert (pc.token_dim, pc.num_attention_heads) == (token_dim, heads)


def test_prompt_config_fields_and_inits():
    c = PromptTuningConfig(num_virtual_tokens=3)
    assert (c.prompt_tuning_init, c.peft_type, c.task_type) == ("RANDOM", "PROMPT_TUNING", "CAUSAL_LM")
    with pytest.raises(ValueError, match="TEXT init needs prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        PrefixTuningConfig()
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be MLP or LSTM"):
        PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="GRU")
    model = tiny("llama")
    words = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(4)
    sampled = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sampled.prompt_encoder["default"]().detach()
    assert all(any(torch.equal(r, w) for w in words) for r in rows)  # each a word's embedding


def test_text_init_uses_the_tokenizer_s_embeddings():
    from lightllm.models import default_model_dir, load_model

    model, tokenizer = load_model(device="cpu")
    text = "To be, or not to be"
    wrapped = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=12, prompt_tuning_init="TEXT",
                                                       prompt_tuning_init_text=text,
                                                       tokenizer_name_or_path=str(default_model_dir())))
    ids = tokenizer(text)["input_ids"]
    want = model.get_input_embeddings().weight[torch.tensor((ids * 12)[:12])].float()
    torch.testing.assert_close(wrapped.prompt_encoder["default"]().detach(), want.detach(), rtol=0, atol=0)


# ---- generate() against forwards --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_agrees_with_step_by_step_forwards(family, method):
    """Greedy generate with and without a cache equals greedy decoding by full forward passes, on a
    batch with left padding; the padded row equals the same prompt alone (but with a sliding window,
    whose positions count the padding); the virtual tokens change
    the output (the prefix is not silently dropped); sampling with a seed and beam search give the
    same tokens with and without a cache."""
    wrapped = randomized(get_peft_model(tiny(family), METHODS[method]()))
    ids, mask = batch()
    want = greedy_by_forwards(wrapped, ids, mask, 6)
    for use_cache in (True, False):
        got = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               use_cache=use_cache, pad_token_id=0)
        assert torch.equal(got, want), (use_cache, got, want)
    if family != "mistral":  # a sliding window counts the padding's positions too, as for the plain model
        alone = wrapped.generate(input_ids=ids[1:, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(alone, want[1:, 3:])
    with torch.no_grad():  # the virtual tokens change the next-token distribution
        plain = tiny(family)(input_ids=ids, attention_mask=mask).logits[:, -1]
        tuned = wrapped(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert (plain - tuned).abs().max() > 1e-2
    for kwargs in (dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)):
        outs = []
        for use_cache in (True, False):
            torch.manual_seed(7)
            outs.append(wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, use_cache=use_cache,
                                         pad_token_id=0, **kwargs))
        assert torch.equal(*outs), kwargs
        assert outs[0].shape == (2, 12)


def test_generation_caches_hold_the_prefix_once():
    """The prefix is injected at prefill only: the cache generate returns holds P + prompt + new - 1."""
    wrapped = randomized(get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P)))
    ids, mask = batch()
    out = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert cache.get_seq_length() == P + 7 + 4 - 1
    assert out.sequences.shape == (2, 7 + 4)


def test_a_forward_cache_continues_decoding():
    """use_cache=True in eval returns a cache holding the prefix; passing it back continues."""
    wrapped = randomized(get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P)))
    ids, _ = batch(pad=0)
    with torch.no_grad():
        first = wrapped(input_ids=ids[:, :5], use_cache=True)
        cache = getattr(first, "past_key_values", None) or getattr(first, "cache", None)
        assert cache.get_seq_length() == P + 5
        step = wrapped(input_ids=ids[:, 5:], attention_mask=torch.ones_like(ids), use_cache=True, cache=cache).logits
        full = wrapped(input_ids=ids).logits
    torch.testing.assert_close(step, full[:, 5:], rtol=1e-5, atol=1e-5)


# ---- PEFT's files, both ways -----------------------------------------------------------------------

PEFT_CONFIGS = {
    "prefix": lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
    "prefix-mlp": lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM",
                                                       prefix_projection=True, encoder_hidden_size=32),
    "prompt": lambda peft: peft.PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
    "p-tuning": lambda peft: peft.PromptEncoderConfig(num_virtual_tokens=P, task_type="CAUSAL_LM",
                                                      encoder_hidden_size=32),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_s_adapters_load_and_give_peft_s_logits(tmp_path, family, method):
    peft = pytest.importorskip("peft")
    theirs = randomized(peft.get_peft_model(tiny(family), PEFT_CONFIGS[method](peft))).eval()
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tiny(family), tmp_path)
    assert isinstance(ours, PromptLearningModel) and not any(p.requires_grad for p in ours.parameters())
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    # our generation equals greedy decoding by forwards through peft's model (peft's own generate is not
    # the reference: it is one of the things that breaks). peft drops position_ids for prompt and
    # P-tuning, so its forwards number a left-padded row's tokens from the padding: unpadded prompts there.
    if not method.startswith("prefix"):
        ids, mask = batch(pad=0)
    want = greedy_by_forwards(theirs, ids, mask, 5)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                     pad_token_id=0), want)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_our_files_load_in_peft_with_our_logits(tmp_path, family, method):
    peft = pytest.importorskip("peft")
    ours = randomized(get_peft_model(tiny(family), METHODS[method]()))
    ours.save_pretrained(tmp_path, save_encoder=True)  # the extra encoder keys must not disturb peft
    theirs = peft.PeftModel.from_pretrained(tiny(family), tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_the_encoder_travels_with_save_encoder_and_peft_s_files_say_it_is_gone(tmp_path):
    ours = randomized(get_peft_model(tiny("llama"), METHODS["prefix-mlp"]()))
    ours.save_pretrained(tmp_path / "with", save_encoder=True)
    ours.save_pretrained(tmp_path / "without")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "with" / "adapter_model.safetensors"))
    assert keys == {"prompt_embeddings", "prompt_encoder.embedding.weight", "prompt_encoder.transform.0.weight",
                    "prompt_encoder.transform.0.bias", "prompt_encoder.transform.2.weight",
                    "prompt_encoder.transform.2.bias"}
    assert set(load_file(tmp_path / "without" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    resumed = from_pretrained(tiny("llama"), tmp_path / "with", is_trainable=True)
    names = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert any("transform" in n for n in names)  # training resumes through the MLP
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    frozen = from_pretrained(tiny("llama"), tmp_path / "without")  # inference: the computed prefix
    with torch.no_grad():
        torch.testing.assert_close(frozen(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="holds the computed virtual tokens only.*save_encoder=True"):
        from_pretrained(tiny("llama"), tmp_path / "without", is_trainable=True)


# ---- training paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gpt2"])
@pytest.mark.parametrize("method", ["prefix-mlp", "prompt"])
def test_gradient_checkpointing_gives_the_same_gradients(family, method):
    """Non-reentrant checkpointing (PEFT refuses it for prefix tuning): the same loss and gradients as
    without, and the prefix cache does not grow during recomputation. GPT-2's own code drops the
    cache under checkpointing: prefix tuning says so instead of training without its prefix."""
    if method.startswith("prefix") and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x's checkpointed layers drop every cache: refused, not trained without the prefix
        model = tiny(family)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = get_peft_model(model, METHODS[method]())
        wrapped.train()
        ids, _ = batch(pad=0)
        with pytest.raises(ValueError, match=r"transformers 4\.\d+\.\d+ drops the key/value cache of every checkpointed"):
            wrapped(input_ids=ids, labels=ids)
        return
    if family == "gpt2" and method.startswith("prefix"):
        model = tiny(family)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = get_peft_model(model, METHODS[method]())
        wrapped.train()
        ids, _ = batch(pad=0)
        with pytest.raises(ValueError, match="GPT2LMHeadModel drops its key/value cache under gradient checkpointing"):
            wrapped(input_ids=ids, labels=ids)
        return
    grads, losses = [], []
    for checkpointing in (False, True):
        model = tiny(family)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        wrapped = randomized(get_peft_model(model, METHODS[method]()))
        wrapped.train()
        ids, mask = batch(pad=0)
        seen = []
        wrapped.hf_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw.get("cache", kw.get("past_key_values"))), with_kwargs=True)
        out = wrapped(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad})
        if method.startswith("prefix"):  # read by every layer, again in recomputation, and never grown
            (cache,) = seen
            assert cache.get_seq_length() == P
            assert cache.reads == 2 * (2 if checkpointing else 1)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_prefix_on_a_quantized_base_and_stacked_on_lora(tmp_path):
    """A GPTQ-quantized (RTN) base; and prefix tuning over LoRA on the same model, both training."""
    from lightllm.quantization import QuantConfig, quantize_model

    ids, mask = batch(pad=0)
    model = tiny("llama")
    quantize_model(model, ids, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    wrapped = randomized(get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P)))
    want = greedy_by_forwards(wrapped, ids, mask, 4)
    assert torch.equal(wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0), want)
    lora = get_peft_model(tiny("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    both = get_peft_model(lora, PrefixTuningConfig(num_virtual_tokens=P))
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("prompt_encoder" in n for n in trainable)
    both.train()
    both(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in both.named_parameters() if p.requires_grad)
    both.eval()
    want = greedy_by_forwards(both, ids, mask, 4)
    assert torch.equal(both.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0), want)
    with both.disable_adapter():  # the prefix off, LoRA still on
        torch.testing.assert_close(both(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=0, atol=0)
    lora.save_pretrained(tmp_path / "lora")
    both.save_pretrained(tmp_path / "prefix")
    again = get_peft_model(from_pretrained(tiny("llama"), tmp_path / "lora"), PrefixTuningConfig(num_virtual_tokens=P))
    again.delete_adapter("default")
    again.load_adapter(tmp_path / "prefix", "default")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, both(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_named_adapters_switch_and_disable():
    wrapped = randomized(get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P)))
    wrapped.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=3))
    randomized(wrapped, seed=2)
    ids, _ = batch(pad=0)
    with torch.no_grad():
        first = wrapped(input_ids=ids).logits
        wrapped.set_adapter("prompt")
        second = wrapped(input_ids=ids).logits[:, 3:]
        with wrapped.disable_adapter():
            plain = wrapped(input_ids=ids).logits
    torch.testing.assert_close(plain, logits_of(tiny("llama"), ids), rtol=0, atol=0)
    assert (first - second).abs().max() > 1e-3 and (first - plain).abs().max() > 1e-3
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt." in n for n in trainable)
    wrapped.print_trainable_parameters()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- bad input --------------------------------------------------------------------------------------

def test_bad_input_is_refused_and_the_model_stays_as_it_was(tmp_path):
    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="needs a causal LM whose forward takes a key/value cache"):
        get_peft_model(NoCache(), PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="token_dim 30 is not divisible by num_attention_heads 4"):
        get_peft_model(tiny("gpt2"), PrefixTuningConfig(num_virtual_tokens=P, token_dim=30, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"do not fit the model's key/value cache \(2 layers of 4 key/value heads of 16"):
        get_peft_model(tiny("gpt2"), PrefixTuningConfig(num_virtual_tokens=P, token_dim=32, num_attention_heads=4))
    gpt2 = get_peft_model(tiny("gpt2"), PrefixTuningConfig(num_virtual_tokens=60))
    with pytest.raises(ValueError, match="67 positions .* exceed the model's max_position_embeddings 64"):
        gpt2(input_ids=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 64"):
        gpt2.generate(input_ids=torch.ones(1, 7, dtype=torch.long), max_new_tokens=2)
    # a file for another model
    get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P)).save_pretrained(tmp_path / "llama")
    target = tiny("gemma")
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(5, 128\) but the prompt encoder needs \(5, 96\)"):
        from_pretrained(target, tmp_path / "llama")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["token_dim"] == 32 and config["num_attention_heads"] == 2


# ---- it trains ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prefix-mlp", "prompt"])
def test_prefix_and_prompt_tuning_learn_on_the_embedded_model(method):
    """40 steps of 4 x 128 tokens of Macbeth's first 85% (benchmarks/tuning_training.py's loop): the
    loss on fixed training windows falls and the held-out last 15% improves by at least 3%."""
    from lightllm import data
    from lightllm.eval import perplexity, tokenize_stream
    from lightllm.models import load_model
    from lightllm.optim import AdamW8bit

    config = {"prefix-mlp": PrefixTuningConfig(num_virtual_tokens=16, prefix_projection=True, init_weights="zero"),
              "prompt": PromptTuningConfig(num_virtual_tokens=16, prompt_tuning_init="SAMPLE_VOCAB")}[method]
    play = data.shakespeare_text("heldout")
    play = play[: len(play) // 2]
    cut = int(len(play) * 0.85)
    model, tokenizer = load_model(device="cpu")
    torch.manual_seed(0)
    wrapped = get_peft_model(model, config)
    wrapped.eval()
    ids = tokenize_stream(tokenizer, play[:cut])
    fixed = data.calibration_samples(ids, 8, 128, seed=99)

    def train_loss():
        with torch.no_grad():
            return float(wrapped(input_ids=fixed, labels=fixed).loss)

    before, loss_before = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False), train_loss()
    opt = AdamW8bit([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    for batch_ids in data.calibration_samples(ids, 160, 128, seed=1).view(40, 4, 128):
        wrapped(input_ids=batch_ids, labels=batch_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    wrapped.eval()
    after, loss_after = perplexity(wrapped, tokenizer, play[cut:], seqlen=256, progress=False), train_loss()
    assert loss_after < loss_before - 0.03, (loss_before, loss_after)
    assert after < 0.97 * before, (before, after)


# ---- review findings, each pinned ---------------------------------------------------------------------

def test_generate_without_a_length_and_with_a_generation_config():
    """transformers 5's configs leave max_length unset; a generation_config object's lengths count
    the prompt, so they are shifted past the placeholders too."""
    from transformers import GenerationConfig

    wrapped = randomized(get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=P)))
    ids, mask = batch(pad=0)
    plain = tiny("llama").generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    out = wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    assert out.shape == plain.shape
    fixed = GenerationConfig(max_length=13, min_length=13, eos_token_id=int(out[0, 8]), pad_token_id=0, do_sample=False)
    assert wrapped.generate(input_ids=ids, attention_mask=mask, generation_config=fixed).shape == (2, 13)
    assert torch.equal(wrapped.generate(inputs=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0),
                       greedy_by_forwards(wrapped, ids, mask, 3))


def test_decoding_loops_continue_from_the_caches_forward_returns():
    """The default forward keeps a cache with the prefix in it; an empty cache the caller passes is
    filled; positions passed on continuation are real-token positions."""
    from transformers.cache_utils import DynamicCache

    wrapped = randomized(get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P)))
    ids, _ = batch(pad=0)
    with torch.no_grad():
        full = wrapped(input_ids=ids).logits
        out = wrapped(input_ids=ids[:, :5])
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        torch.testing.assert_close(wrapped(input_ids=ids[:, 5:], past_key_values=cache).logits, full[:, 5:],
                                   rtol=1e-5, atol=1e-5)
        mine = DynamicCache()
        wrapped(input_ids=ids[:, :5], past_key_values=mine, position_ids=torch.arange(5).expand(2, 5))
        step = wrapped(input_ids=ids[:, 5:], past_key_values=mine, position_ids=torch.arange(5, 7).expand(2, 2)).logits
        torch.testing.assert_close(step, full[:, 5:], rtol=1e-5, atol=1e-5)
    wrapped.train()
    out = wrapped(input_ids=ids, labels=ids)  # training: the read-only cache is not handed out
    assert getattr(out, "past_key_values", None) is None and getattr(out, "cache", None) is None


def test_processors_stopping_criteria_and_streamers_do_not_see_the_placeholders():
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    wrapped = randomized(get_peft_model(tiny("gpt2"), PromptTuningConfig(num_virtual_tokens=P)))
    ids, mask = batch(pad=0)
    penalty = RepetitionPenaltyLogitsProcessor(3.0)
    want = ids
    for _ in range(5):  # greedy forwards with the penalty on the real tokens only
        with torch.no_grad():
            scores = penalty(want, wrapped(input_ids=want).logits[:, -1])
        want = torch.cat([want, scores.argmax(-1, keepdim=True)], 1)
    got = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                           repetition_penalty=3.0)
    assert torch.equal(got, want)
    seen = []

    class Record:
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            return scores

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    class Streamer:
        def __init__(self):
            self.first = None

        def put(self, value):
            self.first = value if self.first is None else self.first

        def end(self):
            pass

    streamer = Streamer()
    out = wrapped.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([Record()]),
                           stopping_criteria=StoppingCriteriaList([StopAt()]), streamer=streamer)
    assert seen[0] == 7 and out.shape == (1, 9) and torch.equal(streamer.first.reshape(-1), ids[0])


def test_stacking_two_prompt_wrappers_is_refused_and_saving_ignores_dropout(tmp_path):
    wrapped = get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="already has a prompt-learning wrapper: add the method as another named adapter"):
        get_peft_model(wrapped, PromptTuningConfig(num_virtual_tokens=P))
    lstm = get_peft_model(tiny("llama"), PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                            encoder_reparameterization_type="LSTM", encoder_dropout=0.5))
    lstm.train()
    one, two = lstm.adapter_state_dict("default"), lstm.adapter_state_dict("default")
    assert torch.equal(one["prompt_embeddings"], two["prompt_embeddings"]) and lstm.training


def test_a_text_initialized_file_resumes_without_its_tokenizer(tmp_path):
    from lightllm.models import default_model_dir, load_model

    model, _ = load_model(device="cpu")
    wrapped = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                                       prompt_tuning_init_text="Macbeth",
                                                       tokenizer_name_or_path=str(default_model_dir())))
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["tokenizer_name_or_path"] = str(tmp_path / "gone")  # the tokenizer is not needed to load
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    resumed = from_pretrained(load_model(device="cpu")[0], tmp_path, is_trainable=True)
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
