"""The prompt encoders: what produces the virtual tokens of each prompt-learning method.

Each returns, for its P virtual tokens, ``[P, width]`` in float32: prefix tuning's width is
``num_layers * 2 * token_dim`` (every layer's key and value per virtual token, in PEFT's order:
layer l's key is block 2l and its value block 2l + 1), prompt and P-tuning's is ``token_dim`` (input
embeddings). Module names follow PEFT (``embedding``, ``transform``, ``mlp_head``, ``lstm_head``), so
the trained encoders' state dicts read the same. Only their output is PEFT's file
(``prompt_embeddings``); a file without the encoder loads into a :class:`FlatPromptEncoder` that holds
the output itself (the reparameterization is gone then, as in PEFT's inference mode).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig


def output_width(config) -> int:
    """Width of the encoder's output (the saved ``prompt_embeddings``)."""
    if isinstance(config, PrefixTuningConfig):
        return config.num_layers * 2 * config.token_dim
    return config.token_dim


def reparameterized(config) -> bool:
    """Whether the method trains its virtual tokens through a network (an MLP or LSTM) that its
    PEFT file does not keep."""
    if isinstance(config, PrefixTuningConfig):
        return bool(config.prefix_projection)
    return isinstance(config, PromptEncoderConfig)


class PromptEncoderBase(nn.Module):
    """``forward()`` gives the [P, width] float32 virtual tokens."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width

    def has_reparameterization(self) -> bool:
        return False


class FlatPromptEncoder(PromptEncoderBase):
    """The virtual tokens themselves, trainable: what a file without the encoder gives (PEFT's
    inference-mode encoders are this)."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__(num_tokens, width)
        self.embedding = nn.Embedding(num_tokens, width)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PrefixEncoder(PromptEncoderBase):
    """Every layer's prefix keys and values: ``Embedding(P, L*2*token_dim)``, or with
    ``prefix_projection`` ``Embedding(P, token_dim) -> Linear(token_dim, hidden) -> Tanh ->
    Linear(hidden, L*2*token_dim)``."""

    def __init__(self, config: PrefixTuningConfig):
        width = config.num_layers * 2 * config.token_dim
        super().__init__(config.num_virtual_tokens, width)
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def has_reparameterization(self) -> bool:
        return self.prefix_projection

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


class PromptEmbedding(PromptEncoderBase):
    """Prompt tuning: ``Embedding(P, token_dim)``, initialized as the config says."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__(config.num_virtual_tokens, config.token_dim)
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        if config.inference_mode:
            return  # the weights come from a file
        p = config.num_virtual_tokens
        ids = None
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (p,))
        elif config.prompt_tuning_init == "TEXT":
            from transformers import AutoTokenizer

            kwargs = dict(config.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # a config must not run code from a hub repository
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if not text_ids:
                raise ValueError("PromptTuningConfig: prompt_tuning_init_text tokenizes to nothing")
            ids = torch.tensor((text_ids * (p // len(text_ids) + 1))[:p])  # repeated or cut to P tokens
        if ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(PromptEncoderBase):
    """P-tuning: ``Embedding(P, token_dim)`` through an MLP (Linear-ReLU-Linear-ReLU-Linear) or a
    bidirectional LSTM and Linear-ReLU-Linear."""

    def __init__(self, config: PromptEncoderConfig):
        super().__init__(config.num_virtual_tokens, config.token_dim)
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.encoder_type = config.encoder_reparameterization_type
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def has_reparameterization(self) -> bool:
        return True

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def build_encoder(config, word_embeddings: nn.Embedding, flat: bool = False) -> PromptEncoderBase:
    """The encoder of ``config``; ``flat``: just its output, to be loaded from a file."""
    if flat:
        return FlatPromptEncoder(config.num_virtual_tokens, output_width(config))
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings)
    return PromptEncoder(config)
