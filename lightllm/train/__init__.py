"""Instruction fine-tuning: data (records, templates, tokenization), batches, the training loop on
Accelerate, and the CLI."""
