"""PromptLearningModel: prefix tuning, prompt tuning and P-tuning on a causal LM.

How the virtual tokens reach the model, built on transformers' public Cache API and module hooks
only (no model's attention code is touched, so the same path serves LLaMA, Qwen, Gemma, Mistral,
GPT-2 and the rest):

* Prefix tuning: the prefix keys and values go into a ``DynamicCache`` built from the model's config
  (``cache.update(k, v, layer)`` per layer, as PEFT stores them: no rotary embedding), as if P
  tokens had already been processed. The attention mask gets P ones in front and the real tokens'
  positions start at P, both as PEFT does, so the logits of PEFT's adapters are reproduced. For a
  forward pass that keeps no cache (training, ``use_cache=False``) the cache is read-only: its
  ``update`` returns prefix + new states without storing them, so gradient checkpointing's
  recomputation sees the same keys (PEFT refuses checkpointing; transformers drops caches under it
  unless a layer only reads the cache, which this one does, and says so to transformers).
* Prompt tuning and P-tuning: P embeddings before the input embeddings, mask ones, labels -100.
* ``generate()``: P placeholder tokens are put in front of the prompt, and a forward pre-hook on the
  model replaces them, at prefill only, by the prefix (into the cache generate made) or by the
  virtual embeddings. From then on every length, position, mask, beam reorder and sliding window
  is transformers' own arithmetic on a sequence that really is P tokens longer; the placeholders
  are cut from the output. With ``use_cache=False`` every step is a prefill.

Files: PEFT's (``adapter_config.json`` and one tensor ``prompt_embeddings``, the encoder's output:
[P, layers * 2 * token_dim] for prefix tuning, [P, token_dim] for the others). With
``save_encoder=True`` the reparameterization (the MLP or LSTM) is kept too, under
``prompt_encoder.<parameter>`` keys that PEFT ignores, so training can resume with it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import pathlib

import torch
from torch import nn

from ..save_load import check_tensors, json_writer, read_json, read_tensors, tensors_writer, write_files_atomically
from ..tuner import (BIN_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, AdapterStateDict, BaseModelHolder, TunerModel,
                     _forgive_missing_base_keys, count_parameters)
from .config import (PrefixTuningConfig, PromptLearningConfig, prepare_config)
from .layer import FlatPromptEncoder, PromptEncoderBase, build_encoder, output_width, reparameterized

logger = logging.getLogger("lightllm")

EMBEDDINGS_KEY = "prompt_embeddings"
ENCODER_PREFIX = "prompt_encoder."


_PREFIX_CACHE_CLASS = None


def prefix_cache_class():
    """A DynamicCache that can be made read-only (defined on first use: transformers is imported
    lazily)."""
    global _PREFIX_CACHE_CLASS
    if _PREFIX_CACHE_CLASS is None:
        from transformers.cache_utils import DynamicCache

        class PrefixCache(DynamicCache):
            """A DynamicCache holding a prefix. ``read_only``: ``update`` returns what the layer would
            return (prefix + the new states, as the layer's own rules make them, sliding windows
            included) without storing the new states: the same keys every time a layer is run
            again (gradient checkpointing), and a cache that stays at the prefix."""

            read_only = False
            reads = 0  # how many times a layer read the prefix (0 after a forward: the model dropped the cache)

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                self.reads += 1
                if not self.read_only:
                    return super().update(key_states, value_states, layer_idx, *args, **kwargs)
                # Dynamic layers rebind their tensors in update (no in-place writes): a shallow copy
                # updates without touching this cache.
                return copy.copy(self.layers[layer_idx]).update(key_states, value_states, *args, **kwargs)

        _PREFIX_CACHE_CLASS = PrefixCache
    return _PREFIX_CACHE_CLASS


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside (a LoRA or adapter wrapper's base model)."""
    while isinstance(model, (TunerModel, PromptLearningModel)):
        model = model.model
    return model


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on (its name since 5.25, then the older one)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _layers_drop_caches_when_checkpointed(model: nn.Module) -> bool:
    """transformers 4.x: every GradientCheckpointingLayer sets its cache argument to None under
    gradient checkpointing; 5.x added ``_can_checkpoint_with_cache`` to let a cache through."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return (not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
            and any(isinstance(m, GradientCheckpointingLayer) for m in model.modules()))


@contextlib.contextmanager
def _cache_survives_checkpointing(model: nn.Module, on: bool):
    """Tell transformers' checkpointed layers that they may keep the cache under gradient
    checkpointing (``_can_checkpoint_with_cache``: for layers that only read it, which is what a
    read-only prefix cache makes them)."""
    layers = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")] if on else []
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


class _ProcessorWithoutPlaceholders:
    """A logits processor that sees the sequences without the P placeholders generate runs on."""

    def __init__(self, inner, p: int):
        self.inner, self.p = inner, p

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.p:], scores)


class _CriterionWithoutPlaceholders:
    """A stopping criterion that sees the sequences without the placeholders."""

    def __init__(self, inner, p: int):
        self.inner, self.p = inner, p

    def __call__(self, input_ids, scores, **kwargs):
        return self.inner(input_ids[:, self.p:], scores, **kwargs)


class _StreamerWithoutPlaceholders:
    """A streamer whose first ``put`` (the prompt) arrives without the placeholders."""

    def __init__(self, inner, p: int):
        self.inner, self.p, self.first = inner, p, True

    def put(self, value):
        if self.first:
            self.first = False
            value = value[..., self.p:]
        self.inner.put(value)

    def end(self):
        self.inner.end()


def _hide_placeholders(gen, kwargs: dict, p: int) -> None:
    """Keep what reads the token history from seeing the placeholders: the user's logits
    processors, stopping criteria and streamer are wrapped, and the built-in processors that read
    the history (repetition penalty, n-gram blocking, bad words, sequence bias) are built here,
    wrapped, from the generation config (they then run after transformers' own processors, which
    for sampling means after top-k / top-p)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation import logits_process as lp

    wrap = _ProcessorWithoutPlaceholders
    processors = [wrap(x, p) for x in (kwargs.pop("logits_processor", None) or [])]
    if gen.repetition_penalty not in (None, 1.0):
        processors.append(wrap(lp.RepetitionPenaltyLogitsProcessor(gen.repetition_penalty), p))
        gen.repetition_penalty = None
    if gen.no_repeat_ngram_size:
        processors.append(wrap(lp.NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size), p))
        gen.no_repeat_ngram_size = None
    if gen.bad_words_ids is not None:
        processors.append(wrap(lp.NoBadWordsLogitsProcessor(gen.bad_words_ids, gen.eos_token_id), p))
        gen.bad_words_ids = None
    if gen.sequence_bias is not None:
        processors.append(wrap(lp.SequenceBiasLogitsProcessor(gen.sequence_bias), p))
        gen.sequence_bias = None
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    if kwargs.get("stopping_criteria"):
        kwargs["stopping_criteria"] = StoppingCriteriaList([_CriterionWithoutPlaceholders(x, p)
                                                            for x in kwargs["stopping_criteria"]])
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _StreamerWithoutPlaceholders(kwargs["streamer"], p)


_BACKBONE = "_lightllm_backbone_only"


class PromptBaseModelHolder(BaseModelHolder):
    """The prompt-learning wrapper's ``base_model``: called (TRL's fused LM head), it runs the
    wrapper's forward with the virtual tokens, through the backbone, and returns the hidden states
    of the real tokens (see :class:`~lightllm.tuning.tuner.BaseModelHolder`)."""

    def forward(self, *args, **kwargs):
        run = self.__dict__.get("run")
        return run(*args, **kwargs) if run is not None else super().forward(*args, **kwargs)


class PromptLearningModel(AdapterStateDict, nn.Module):
    """A causal LM with prompt-learning adapters (``base_model.model`` is the user's model, which
    may itself be a LoRA or adapter wrapper: the methods stack)."""

    method_name = "prompt learning"

    def __init__(self, model: nn.Module, config: PromptLearningConfig | None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = PromptBaseModelHolder()
        self.base_model.model = model
        # Called alone (TRL's fused LM head), the backbone still gets the virtual tokens: a bound
        # method in the holder's __dict__ (deepcopy and pickle follow it to the copied wrapper).
        self.base_model.run = self._backbone_forward
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        if isinstance(model, PromptLearningModel):
            raise ValueError("the model already has a prompt-learning wrapper: add the method as another named adapter "
                             "(add_adapter) instead of wrapping it twice")
        hf = _hf_model(model)
        params = inspect.signature(hf.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
        if self._cache_kwarg is None or "inputs_embeds" not in params or not hasattr(hf, "get_input_embeddings"):
            raise ValueError(f"prompt learning needs a causal LM whose forward takes a key/value cache "
                             f"(`past_key_values` or `cache`) and `inputs_embeds`; {type(hf).__name__} does not")
        self.train(model.training)  # the wrapper follows the model's mode (an eval model stays in eval)
        self.register_load_state_dict_post_hook(_forgive_missing_base_keys)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ---- the wrapped model --------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    @property
    def hf_model(self) -> nn.Module:
        return _hf_model(self.model)

    def get_base_model(self) -> nn.Module:
        return self.model

    def adapter_tensor_ids(self) -> set[int]:
        """The prompt encoders' tensors (every named adapter), and those of a wrapper stacked inside."""
        ids = {id(t) for t in [*self.prompt_encoder.parameters(), *self.prompt_encoder.buffers()]}
        if isinstance(self.model, AdapterStateDict):
            ids |= self.model.adapter_tensor_ids()
        return ids

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)

    @property
    def config(self):
        return self.hf_model.config

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PromptLearningConfig, _flat: bool = False) -> None:
        if not isinstance(config, PromptLearningConfig):
            raise TypeError(f"PromptLearningModel takes a PrefixTuningConfig, PromptTuningConfig or PromptEncoderConfig, "
                            f"got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        hf = self.hf_model
        config = prepare_config(config, hf.config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(hf, "name_or_path", None) or None
        self._check_fits(config)
        words = hf.get_input_embeddings()
        encoder = build_encoder(config, words, flat=_flat).to(words.weight.device)
        encoder.train(self.training)
        self.prompt_encoder[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        if not isinstance(self.model, (TunerModel, PromptLearningModel)):
            for p in self.model.parameters():  # a stacked LoRA or adapter keeps what it trains
                p.requires_grad_(False)
        if self.active_adapter not in self.peft_config:
            self.active_adapter = adapter_name
        self._mark_trainable()

    def _check_fits(self, config: PromptLearningConfig) -> None:
        """The config's shapes must be the model's: a prefix's per-layer keys are what the model's
        attention reads (num_key_value_heads x head_dim), prompts are input embeddings."""
        hf = self.hf_model
        text = hf.config.get_text_config(decoder=True) if hasattr(hf.config, "get_text_config") else hf.config
        width = hf.get_input_embeddings().weight.shape[1]
        name = type(config).__name__
        if isinstance(config, PrefixTuningConfig):
            layers = next((getattr(text, n) for n in ("num_hidden_layers", "num_layers", "n_layer")
                           if getattr(text, n, None) is not None), None)
            heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
            kv = getattr(text, "num_key_value_heads", None) or heads
            head_dim = getattr(text, "head_dim", None) or width // heads
            if (config.num_layers, config.token_dim, config.num_attention_heads) != (layers, kv * head_dim, kv):
                raise ValueError(f"{name}: num_layers={config.num_layers}, token_dim={config.token_dim}, "
                                 f"num_attention_heads={config.num_attention_heads} do not fit the model's key/value "
                                 f"cache ({layers} layers of {kv} key/value heads of {head_dim}: num_layers={layers}, "
                                 f"token_dim={kv * head_dim}, num_attention_heads={kv})")
        elif config.token_dim != width:
            raise ValueError(f"{name}: token_dim={config.token_dim} but the model's input embeddings are {width} wide")

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """The model without the virtual tokens inside the block."""
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False

    def _mark_trainable(self) -> None:
        for name, encoder in self.prompt_encoder.items():
            on = name == self.active_adapter and not self.peft_config[name].inference_mode
            for p in encoder.parameters():
                p.requires_grad_(on)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def _active(self) -> tuple[PromptLearningConfig, PromptEncoderBase] | None:
        if self._disabled or self.active_adapter not in self.peft_config:
            return None
        return self.peft_config[self.active_adapter], self.prompt_encoder[self.active_adapter]

    # ---- the virtual tokens ---------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    def _prefix_layers(self, config: PrefixTuningConfig, encoder, batch: int):
        """Per layer (keys, values) [batch, kv heads, P, head_dim] in the model's dtype."""
        p, heads = config.num_virtual_tokens, config.num_attention_heads
        out = encoder().to(self._dtype())
        t = out.view(p, 2 * config.num_layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        return [(t[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), t[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(config.num_layers)]

    def _filled_cache(self, config, encoder, batch: int, read_only: bool, cache=None):
        if cache is None:
            cache = prefix_cache_class()(config=self.hf_model.config)
        for i, (k, v) in enumerate(self._prefix_layers(config, encoder, batch)):
            cache.update(k, v, i)
        if read_only:
            cache.read_only = True
        return cache

    def _prompt_embeds(self, encoder, input_ids, inputs_embeds):
        if inputs_embeds is None:
            inputs_embeds = self.hf_model.get_input_embeddings()(input_ids)
        prompts = encoder().to(inputs_embeds.dtype).unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
        return torch.cat([prompts, inputs_embeds], dim=1)

    def _check_length(self, total: int) -> None:
        text = self.hf_model.config
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if limit is not None and total > limit:
            raise ValueError(f"{self.active_adapter!r}: {total} positions (the virtual tokens and the input) exceed the "
                             f"model's max_position_embeddings {limit}")

    # ---- forward ------------------------------------------------------------------------------------
    def _backbone_forward(self, *args, **kwargs):
        """The forward below through the wrapped model's backbone (no LM head): hidden states of the
        real tokens, for a caller that applies the output embeddings itself. The class's forward, not
        the instance's: accelerate replaces that with one wrapped in a single torch.autocast object,
        which re-entered from inside itself would leave autocast switched on when it exits."""
        return type(self).forward(self, *args, **kwargs, **{_BACKBONE: True})

    def _call_model(self, backbone: bool, **kwargs):
        if not backbone:
            return self.model(**kwargs)
        if kwargs.get("labels") is None:
            kwargs.pop("labels", None)
        return BaseModelHolder.forward(self.base_model, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                use_cache=None, **kwargs):
        backbone = kwargs.pop(_BACKBONE, False)
        active = self._active()
        cache = kwargs.pop("cache", None)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if active is None:
            if cache is not None:
                kwargs[self._cache_kwarg] = cache
            return self._call_model(backbone, input_ids=input_ids, attention_mask=attention_mask,
                                    inputs_embeds=inputs_embeds, labels=labels, position_ids=position_ids,
                                    use_cache=use_cache, **kwargs)
        config, encoder = active
        p = config.num_virtual_tokens
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("PromptLearningModel: pass input_ids or inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        if use_cache is None:  # the model's own default, as transformers resolves it
            use_cache = getattr(self.hf_model.config, "use_cache", True) is not False
        read_only_cache = cache is not None and getattr(cache, "read_only", False)
        if read_only_cache:
            cache = None  # a training-time cache holds the prefix only: start afresh
        if cache is not None and cache.get_seq_length() > 0:
            # A cache this model returned (or one a caller filled through it): the virtual tokens are
            # in it already, and the caller's positions and mask count the real tokens only.
            past = cache.get_seq_length()
            if attention_mask is not None and attention_mask.shape[1] == past + length - p:
                attention_mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
            if position_ids is not None:
                position_ids = position_ids + p
            self._check_length(past + length)
            kwargs[self._cache_kwarg] = cache
            return self._call_model(backbone, input_ids=input_ids, attention_mask=attention_mask,
                                    inputs_embeds=inputs_embeds, labels=labels, position_ids=position_ids,
                                    use_cache=use_cache, **kwargs)
        self._check_length(p + length)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
        if isinstance(config, PrefixTuningConfig):
            keep = use_cache and not self.training
            # An empty cache the caller passed is filled (and then continued from); in training the
            # prefix goes into a read-only cache of ours instead.
            cache = self._filled_cache(config, encoder, batch, read_only=not keep, cache=cache if keep else None)
            kwargs[self._cache_kwarg] = cache
            ours = isinstance(cache, prefix_cache_class())
            if ours:
                cache.reads = 0
            if position_ids is not None:
                position_ids = position_ids + p  # the real tokens come after the prefix, as in PEFT
            hf = self.hf_model
            checkpointing = not keep and self.training and _checkpointing(hf)
            dropped = (f"{type(hf).__name__} drops its key/value cache under gradient checkpointing in its own code, so "
                       "prefix tuning cannot train with checkpointing on this model (LLaMA, Qwen, Gemma, Mistral can); "
                       "turn gradient checkpointing off, or use prompt tuning / P-tuning")
            if checkpointing and _layers_drop_caches_when_checkpointed(hf):
                import transformers

                dropped = (f"transformers {transformers.__version__} drops the key/value cache of every checkpointed "
                           "layer under gradient checkpointing (transformers 5 keeps a cache the layers only read), so "
                           "prefix tuning cannot train with checkpointing here: turn gradient checkpointing off, use "
                           "transformers >= 5.17, or use prompt tuning / P-tuning")
            with _cache_survives_checkpointing(hf, checkpointing):
                try:
                    out = self._call_model(backbone, input_ids=input_ids, attention_mask=attention_mask,
                                           inputs_embeds=inputs_embeds, labels=labels, position_ids=position_ids,
                                           use_cache=use_cache, **kwargs)
                except RuntimeError as e:
                    if checkpointing and ours and cache.reads == 0:
                        raise ValueError(dropped) from e
                    raise
            if ours and cache.reads == 0:
                raise ValueError(dropped if checkpointing else f"{type(hf).__name__} did not read the prefix cache")
            if not keep:  # a read-only cache must not be mistaken for one to continue from
                for name in ("past_key_values", "cache"):
                    if getattr(out, name, None) is cache:
                        setattr(out, name, None)
            return out
        inputs_embeds = self._prompt_embeds(encoder, input_ids, inputs_embeds)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, p), -100), labels], dim=1)
        if position_ids is not None:
            front = torch.arange(p, device=position_ids.device).expand(position_ids.shape[0], p)
            position_ids = torch.cat([front, position_ids + p], dim=1)
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        out = self._call_model(backbone, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                               position_ids=position_ids, use_cache=use_cache, **kwargs)
        if backbone:  # the caller scores the real tokens' positions
            out.last_hidden_state = out.last_hidden_state[:, p:]
        return out

    # ---- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' ``generate`` with the virtual tokens: every decoding strategy, with or
        without a cache, batched prompts with left padding. The output holds the prompt and the
        new tokens, as for the plain model; logits processors, stopping criteria and streamers see
        those too (the placeholders generate runs on are cut from what they read)."""
        hf = self.hf_model
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        active = self._active()
        if active is None:
            return hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("PromptLearningModel.generate takes input_ids (or inputs=), not inputs_embeds")
        config, encoder = active
        p = config.num_virtual_tokens
        gen = copy.deepcopy(kwargs.pop("generation_config", None) or hf.generation_config)
        explicit_max_length = kwargs.get("max_length") is not None
        kwargs = gen.update(**kwargs)  # what is not a generation setting stays a model argument
        if attention_mask is None:  # as transformers infers it: padding is where the pad token is (not EOS)
            eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
            pad = gen.pad_token_id
            attention_mask = (input_ids.ne(pad).long() if pad is not None and pad not in eos and (input_ids == pad).any()
                              else torch.ones_like(input_ids))
        # transformers 4.x reads the library's default max_length (20, not passed to generate) as 20 new
        # tokens and adds the input's length itself, placeholders included: that one is left as it is
        library_default = (not explicit_max_length and gen.max_length is not None
                           and gen.max_length == type(gen)().max_length)
        if gen.max_new_tokens is None and gen.max_length is not None and not library_default:
            gen.max_length += p  # lengths of the whole sequence count P too
        if gen.min_length:
            gen.min_length += p
        _hide_placeholders(gen, kwargs, p)
        batch = input_ids.shape[0]
        ids = torch.cat([input_ids.new_zeros((batch, p)), input_ids], dim=1)
        mask = torch.cat([attention_mask.new_ones((batch, p)), attention_mask], dim=1)
        self._check_length(ids.shape[1])
        handle = hf.register_forward_pre_hook(self._generation_hook, with_kwargs=True)
        try:
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **kwargs)
        finally:
            handle.remove()
        if torch.is_tensor(out):
            return out[:, p:]
        out.sequences = out.sequences[:, p:]
        return out

    def _generation_hook(self, module, args, kwargs):
        """At prefill (no cache, a cache still empty, or this model's read-only cache): replace the P
        placeholder tokens by the prefix or the virtual embeddings. Later steps pass."""
        config, encoder = self._active()
        p = config.num_virtual_tokens
        key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(key)
        fresh = cache is None or getattr(cache, "read_only", False)
        if not fresh and cache.get_seq_length() > 0:
            return args, kwargs
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids, args = args[0], args[1:]
        if isinstance(config, PrefixTuningConfig):
            batch = ids.shape[0]
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs[self._cache_kwarg] = self._filled_cache(config, encoder, batch, read_only=fresh,
                                                           cache=None if fresh else cache)
            kwargs["input_ids"] = ids[:, p:]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][..., p:]
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = kwargs["cache_position"][p:]
        else:
            kwargs["input_ids"] = None
            kwargs["inputs_embeds"] = self._prompt_embeds(encoder, ids[:, p:], None)
        return args, kwargs

    # ---- files -------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, save_encoder: bool = False) -> dict[str, torch.Tensor]:
        encoder = self.prompt_encoder[adapter_name]
        was_training = encoder.training
        encoder.eval()  # the virtual tokens without dropout (an LSTM encoder's), as inference will see them
        try:
            with torch.no_grad():
                out = {EMBEDDINGS_KEY: encoder()}
        finally:
            encoder.train(was_training)
        if save_encoder and encoder.has_reparameterization():  # else the embedding is prompt_embeddings itself
            if isinstance(encoder, FlatPromptEncoder):
                raise ValueError(f"adapter {adapter_name!r} was loaded from a file without its prompt encoder: there is "
                                 "no reparameterization to save")
            out.update({ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save_pretrained(self, directory, selected_adapters: list[str] | None = None, safe_serialization: bool = True,
                        save_encoder: bool = False) -> None:
        """PEFT's layout: ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) with
        ``prompt_embeddings``; adapters other than "default" in a sub-folder. ``save_encoder``: keep
        the prompt encoder (``prompt_encoder.*`` keys, which PEFT ignores) to resume training with
        its reparameterization."""
        root = pathlib.Path(directory)
        for adapter in selected_adapters or list(self.peft_config):
            if adapter not in self.peft_config:
                raise ValueError(f"no adapter named {adapter!r}; adapters: {sorted(self.peft_config)}")
            config = self.peft_config[adapter].to_dict()
            config["inference_mode"] = True
            out = root if adapter == "default" else root / adapter
            weights = WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME
            write_files_atomically(out, {
                weights: tensors_writer(self.adapter_state_dict(adapter, save_encoder), safe_serialization),
                CONFIG_NAME: json_writer(config),
            })

    @classmethod
    def read_adapter(cls, directory):
        from ..config import config_from_dict

        path = pathlib.Path(directory)
        config = config_from_dict(read_json(path / CONFIG_NAME))
        if not isinstance(config, PromptLearningConfig):
            raise ValueError(f"{path} holds a {config.PEFT_TYPE} adapter, not a prompt-learning one")
        tensors, weights = read_tensors(path, (WEIGHTS_NAME, BIN_WEIGHTS_NAME))
        return config, tensors, weights

    def _load(self, config: PromptLearningConfig, tensors: dict[str, torch.Tensor], path, adapter_name: str,
              is_trainable: bool) -> None:
        """Check a file against the model, then add it as ``adapter_name``; nothing changes on a
        mismatch. A file with the encoder (``prompt_encoder.*``, lightllm's) restores it; PEFT's
        (only ``prompt_embeddings``) loads the virtual tokens themselves."""
        config.inference_mode = not is_trainable
        hf = self.hf_model
        config = prepare_config(config, hf.config)
        self._check_fits(config)
        with_encoder = any(k.startswith(ENCODER_PREFIX) for k in tensors)
        expected = {EMBEDDINGS_KEY: ("the prompt encoder", (config.num_virtual_tokens, output_width(config)))}
        if with_encoder:
            import dataclasses

            probe = build_encoder(dataclasses.replace(config, inference_mode=True), hf.get_input_embeddings())
            expected.update({ENCODER_PREFIX + k: ("the prompt encoder", tuple(v.shape))
                             for k, v in probe.state_dict().items()})
        check_tensors(expected, tensors, path, optional=set(expected) - {EMBEDDINGS_KEY} if not with_encoder else set())
        flat = not with_encoder
        if is_trainable and flat and reparameterized(config):
            raise ValueError(f"{path} holds the computed virtual tokens only (PEFT does not save the "
                             f"{'prefix MLP' if isinstance(config, PrefixTuningConfig) else 'prompt encoder'}): it loads "
                             "for inference (is_trainable=False); to resume training with the reparameterization, "
                             "save with lightllm's save_encoder=True")
        self.add_adapter(adapter_name, config, _flat=flat)
        encoder = self.prompt_encoder[adapter_name]
        if with_encoder:
            encoder.load_state_dict({k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)})
        else:
            encoder.embedding.weight.copy_(tensors[EMBEDDINGS_KEY])
        self._mark_trainable()

    @torch.no_grad()
    def load_adapter(self, directory, adapter_name: str = "default", is_trainable: bool = False, *,
                     revision: str | None = None, subfolder: str | None = None) -> None:
        from ...hub import resolve_folder

        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; load under a new name")
        config, tensors, path = self.read_adapter(resolve_folder(directory, revision, subfolder, what="adapter"))
        self._load(config, tensors, path, adapter_name, is_trainable)

    @classmethod
    @torch.no_grad()
    def from_pretrained(cls, model: nn.Module, config: PromptLearningConfig, tensors, path,
                        adapter_name: str = "default", is_trainable: bool = False) -> "PromptLearningModel":
        wrapper = cls(model, None, adapter_name)
        wrapper._load(config, tensors, path, adapter_name, is_trainable)
        return wrapper
