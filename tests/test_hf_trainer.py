"""lightllm-tuned models with transformers' Trainer and TRL's SFTTrainer, default arguments.

Each method (LoRA, bottleneck adapter, prefix, prompt, P-tuning) trains a few steps on the
embedded model with default TrainingArguments (the dataset's extra columns left for the Trainer
to drop), saves checkpoints holding the adapter only, evaluates, and resumes from a checkpoint
with the same losses as an uninterrupted run.
"""

import inspect
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from lightllm.models import load_model  # noqa: E402
from lightllm.tuning import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,  # noqa: E402
                             PromptTuningConfig, from_pretrained, get_peft_model)
from lightllm.tuning.trainer import SaveAdapterCallback  # noqa: E402

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "adapter": lambda: AdapterConfig(bottleneck_size=8, target_modules=["down_proj"]),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
}

TEXTS = ["To be, or not to be, that is the question", "Now is the winter of our discontent",
         "All the world's a stage, and all the men", "Friends, Romans, countrymen, lend me your ears",
         "If music be the food of love, play on", "A horse! a horse! my kingdom for a horse!",
         "What's in a name? That which we call a rose", "The lady doth protest too much, methinks"]
LENGTH = 12


@pytest.fixture(scope="module")
def tokenizer():
    return load_model()[1]


def tuned(method, seed=0):
    model, _ = load_model()
    torch.manual_seed(seed)
    return get_peft_model(model, CONFIGS[method]())


def dataset(tokenizer, texts=TEXTS):
    """Fixed-length rows; the "text" and "id" columns are not forward arguments: the Trainer drops them."""
    enc = tokenizer(texts, truncation=True, max_length=LENGTH, padding="max_length")
    if tokenizer.pad_token is None and any(len(x) < LENGTH for x in enc["input_ids"]):
        raise AssertionError("padding needs a pad token")
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": labels, "text": texts, "id": list(range(len(texts)))})


@pytest.fixture(scope="module")
def data(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dataset(tokenizer)


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_forward_signature_names_the_base_models_arguments():
    wrapped = tuned("lora")
    params = inspect.signature(wrapped.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert "labels" in inspect.signature(type(wrapped).forward).parameters  # the Trainer's label names


# transformers 4.x drops every checkpointed layer's cache: prefix tuning refuses checkpointing there
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_state_dict_copy_and_pickle(method):
    """The adapter-only state_dict loads back strictly; copies and pickles keep the signature and,
    for prompt learning, the backbone call bound to the copy."""
    import copy
    import io

    wrapped = tuned(method).eval()
    state = wrapped.state_dict()
    assert set(state) == wrapped.adapter_state_keys() and not set(state) & wrapped.base_state_keys()
    wrapped.load_state_dict(state)  # strict
    wrapped.load_state_dict({**{"base_model.model." + k: v for k, v in wrapped.base_model.model.state_dict().items()},
                             **state})  # a whole model's dict as well
    ids = torch.tensor([[5, 6, 7, 8]])
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(wrapped), torch.load(buffer, weights_only=False)):
        assert "input_ids" in inspect.signature(other.forward).parameters and other.forward.__self__ is other
        if method == "prompt":
            assert other.base_model.run.__self__ is other
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, wrapped(input_ids=ids).logits)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainer_trains_saves_evaluates_and_resumes(method, data, tmp_path):
    wrapped = tuned(method)
    base = {n: p.detach().clone() for n, p in wrapped.base_model.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(not p.requires_grad for n, p in wrapped.named_parameters() if n not in trainable)
    trainer = Trainer(model=wrapped, args=arguments(tmp_path / "run"), train_dataset=data, eval_dataset=data,
                      callbacks=[SaveAdapterCallback()])
    trainer.train()
    full = losses(trainer)
    assert sorted(full) == [1, 2, 3, 4] and all(math.isfinite(v) for v in full.values())
    after = dict(wrapped.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items()), "no trainable parameter changed"
    frozen = dict(wrapped.base_model.model.named_parameters())
    assert all(torch.equal(frozen[n], v) and not frozen[n].requires_grad for n, v in base.items()), "base changed"

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])

    # A checkpoint holds the adapter (lightllm's files, and the Trainer's model.safetensors of the
    # wrapper's adapter-only state_dict), not the model.
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "optimizer.pt"} <= files
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == wrapped.adapter_state_keys() and saved
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in wrapped.parameters()) / 10
    reloaded = from_pretrained(load_model()[0], tmp_path / "run")  # the final adapter, in output_dir
    assert type(reloaded) is type(wrapped)

    # Resume from step 2: steps 3 and 4 give the uninterrupted run's losses.
    again = tuned(method, seed=1)  # other initial adapter values: the checkpoint must replace them
    resumed = Trainer(model=again, args=arguments(tmp_path / "resumed"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    steps = losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json, 3-4 are new
    assert sorted(steps) == [1, 2, 3, 4] and resumed.state.global_step == 4
    assert steps == pytest.approx(full, rel=1e-5)


def test_load_best_model_at_end(data, tmp_path):
    wrapped = tuned("lora")
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, learning_rate=5e-3)
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(os.path.join(best, "model.safetensors"))
    current = wrapped.state_dict()
    assert set(saved) == set(current)
    assert all(torch.equal(saved[k], current[k]) for k in saved), "the best checkpoint's adapter is not loaded"


@pytest.mark.parametrize("method", list(CONFIGS))
def test_gradient_checkpointing(method, data, tmp_path):
    wrapped = tuned(method)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    trainer = Trainer(model=wrapped, args=arguments(tmp_path, max_steps=2, gradient_checkpointing=True),
                      train_dataset=data)
    if method == "prefix" and TRANSFORMERS_4:
        with pytest.raises(ValueError, match="drops the key/value cache of every checkpointed layer"):
            trainer.train()  # refused rather than trained without the prefix
        return
    trainer.train()
    assert wrapped.base_model.model.is_gradient_checkpointing
    assert all(math.isfinite(v) for v in losses(trainer).values())
    after = dict(wrapped.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in before.items()), "a trainable parameter got no gradient"


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_trl_sft_trainer(method, tokenizer, tmp_path):
    trl = pytest.importorskip("trl", reason="trl does not import with this transformers version")
    wrapped = tuned(method)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    data = datasets.Dataset.from_dict({"text": TEXTS})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                         logging_steps=1, report_to=[], use_cpu=True, max_length=LENGTH)
    trainer = trl.SFTTrainer(model=wrapped, args=args, train_dataset=data, processing_class=tokenizer,
                             eval_dataset=data)
    if method == "prefix" and TRANSFORMERS_4 and args.gradient_checkpointing:  # SFTConfig's default
        with pytest.raises(ValueError, match="drops the key/value cache of every checkpointed layer"):
            trainer.train()
        return

    # TRL's fused LM head (model.base_model(...) then the output embeddings) gives our forward's
    # loss; it cannot score the first real token from the virtual tokens, so that one is left out.
    ids = torch.tensor(tokenizer(TEXTS[:2], truncation=True, max_length=8)["input_ids"])
    labels = ids.clone()
    labels[:, 0] = -100
    with torch.no_grad():
        fused = wrapped(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        assert (-fused.mean()).item() == pytest.approx(wrapped(input_ids=ids, labels=labels).loss.item(), rel=1e-5)

    trainer.train()
    assert all(math.isfinite(v) for v in losses(trainer).values()) and losses(trainer)
    after = dict(wrapped.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items())
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert set(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))) == wrapped.adapter_state_keys()
    assert not torch.is_autocast_enabled("cpu"), "training left autocast switched on"
