"""Configuration of megasink's sink / gated attention models for Hugging Face ``transformers``.

Shipped inside every exported sink or gated model directory (``trust_remote_code=True``).
A Llama configuration plus one field: ``megasink_attention`` (``sink`` | ``gated``).
"""
from transformers import LlamaConfig


class MegasinkConfig(LlamaConfig):
    model_type = "megasink"
    # Not a dataclass field on purpose: transformers 4.x and 5.x both keep extra keyword
    # arguments as attributes, so ``MegasinkConfig(megasink_attention="gated")`` works in both.
    megasink_attention = "sink"
    """Attention variant: sink (per-head sink logit in the softmax) | gated (sigmoid head gate)."""


__all__ = ["MegasinkConfig"]
