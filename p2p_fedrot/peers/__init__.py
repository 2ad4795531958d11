"""The hosted peers' models: LoRA factors as flat buffers, the peer bank on one frozen base model,
the frozen-prefix cache, optimizers (GaLore included), local training and evaluation, and adapters
written in peft's layout."""
