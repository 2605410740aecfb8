"""transformers' ``Trainer`` (and TRL's ``SFTTrainer``) with lightllm's tuned models.

A model from :func:`lightllm.tuning.get_peft_model` goes to the ``Trainer`` as it is, with default
``TrainingArguments``: its ``forward`` carries the base model's signature (the ``Trainer`` keeps
the dataset columns it names) and its ``state_dict`` holds the adapters only, which is what the
``Trainer`` writes to a checkpoint (``model.safetensors``) and loads back on
``resume_from_checkpoint`` and ``load_best_model_at_end``.

The ``Trainer`` calls ``save_pretrained`` only on transformers' and peft's own model classes. To
also have each checkpoint folder hold the adapter in lightllm's (PEFT's) layout,
``adapter_config.json`` + ``adapter_model.safetensors``, readable by
:func:`lightllm.tuning.from_pretrained`, pass :class:`SaveAdapterCallback`::

    trainer = Trainer(model=tuned, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()])
"""

from __future__ import annotations

import os

from .._extras import require

require("transformers", "lightllm.tuning.trainer")
from transformers import TrainerCallback  # noqa: E402

__all__ = ["SaveAdapterCallback"]


class SaveAdapterCallback(TrainerCallback):
    """Writes the model's adapters with its ``save_pretrained`` into every checkpoint folder the
    ``Trainer`` saves (``<output_dir>/checkpoint-<step>``), and into ``output_dir`` when training
    ends. ``save_kwargs`` go to ``save_pretrained`` (``format="adapterhub"`` for bottleneck
    adapters, ``save_encoder=True`` for prompt learning with a reparameterization)."""

    def __init__(self, **save_kwargs):
        self.save_kwargs = save_kwargs

    def _write(self, model, directory: str) -> None:
        save = getattr(model, "save_pretrained", None)
        if save is None or not hasattr(model, "peft_config"):
            return
        save(directory, **self.save_kwargs)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save and model is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self._write(model, folder)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.should_save and model is not None:
            self._write(model, args.output_dir)
        return control
