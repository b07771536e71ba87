"""Configuration of megasink's sink / gated attention models for Hugging Face ``transformers``.

Shipped inside every exported sink or gated model directory (``trust_remote_code=True``).
A Llama configuration (``head_dim``, RoPE scaling ``llama3`` / ``linear`` and tied embeddings are
Llama's own) plus megasink's fields: ``megasink_attention`` (``sink`` | ``gated``), the source
family's attention features ``megasink_qkv_bias`` (Qwen2) and ``megasink_qk_norm`` (Qwen3), the
family itself ``megasink_hf_family``, and ``sliding_window`` (Mistral's window, or None).
"""
from transformers import LlamaConfig


class MegasinkConfig(LlamaConfig):
    model_type = "megasink"
    # Not a dataclass field on purpose: transformers 4.x and 5.x both keep extra keyword
    # arguments as attributes, so ``MegasinkConfig(megasink_attention="gated")`` works in both.
    megasink_attention = "sink"
    """Attention variant: sink (per-head sink logit in the softmax) | gated (sigmoid head gate)."""
    megasink_qkv_bias = False
    """Biases on q_proj, k_proj and v_proj (not o_proj), as Qwen2 has them."""
    megasink_qk_norm = False
    """RMSNorm of every query and key head over head_dim before RoPE (q_norm / k_norm), as Qwen3 has."""
    megasink_hf_family = "llama"
    """The Hugging Face family the model came from (llama | mistral | qwen2 | qwen3); for the record."""
    sliding_window = None
    """The source's sliding window (Mistral): megasink trained with whole-context attention, the same
    function up to the window, so longer contexts are refused; None: no limit."""


__all__ = ["MegasinkConfig"]
