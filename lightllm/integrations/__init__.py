"""Integrations with other libraries, each imported on its own and importing its library lazily
(an optional dependency): ``lightllm.integrations.peft`` registers lightllm's quantized layers with
peft's LoRA."""
