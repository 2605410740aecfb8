"""torch.library custom ops ``lightllm::<name>``: schema, fake implementation, reference, and the
backend implementations (see lightllm.backends for how one is chosen)."""

from . import adapter, blockwise, fourbit, gptq, int8, lora, optim  # noqa: F401  (registers the ops)
