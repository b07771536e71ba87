"""megasink's sink and gated attention as a Llama-family ``transformers`` model.

Shipped inside every exported sink or gated model directory and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Everything but the
attention is Llama (RMSNorm, rotate-half RoPE, SwiGLU, KV cache, generation); the two variants
(megasink's docs/design.md, "The method"):

- sink:  one learnable logit ``sinks[h]`` per head joins the softmax as an extra column with
         no value and is dropped after the softmax, exactly as gpt-oss does. Equivalently the
         ordinary attention output is scaled by ``sigmoid(lse - sinks[h])``.
- gated: ``head_gate`` (a Linear hidden -> heads, with bias) gives one logit per head and
         token; ``sigmoid(logit)`` multiplies that head's attention output before ``o_proj``.

Parameter names beyond Llama's: ``model.layers.N.self_attn.sinks`` (heads,) and
``model.layers.N.self_attn.head_gate.{weight,bias}`` (heads, hidden) / (heads,). Models converted
from other families keep those families' attention features: q/k/v biases (Qwen2,
``megasink_qkv_bias``), per-head q/k RMSNorm before RoPE (Qwen3, ``megasink_qk_norm``:
``self_attn.q_norm`` / ``k_norm``), and a sliding window (Mistral), within which whole-context
attention is the same function: longer contexts are refused.
"""
from typing import Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)

from .configuration_megasink import MegasinkConfig

VARIANTS = ("sink", "gated")


def _allowed_keys(mask: Optional[torch.Tensor], q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1 or H, q_len, k_len) mask of allowed keys from any mask transformers passes.

    eager masks are additive floats (0 / very negative), sdpa masks are booleans (True = attend)
    or None, which transformers only passes when sdpa's own rule is exact: no mask for one query,
    else ``is_causal`` with torch's upper-left alignment (query i sees keys 0..i; with a static
    cache the keys beyond the queries are empty slots).
    """
    if mask is None:
        if q_len == 1:
            return torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def sink_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """gpt-oss sinks: softmax over [scores, sinks[h]], the sink column dropped afterwards.

    query (B, nh, Tq, hd), key/value (B, nkv, Tk, hd) -> (out (B, Tq, nh, hd), probs (B, nh, Tq, Tk)).
    """
    key_states = repeat_kv(key, module.num_key_value_groups)  # (B, nh, Tk, hd)
    value_states = repeat_kv(value, module.num_key_value_groups)
    B, nh, Tq, _ = query.shape
    Tk = key_states.shape[2]
    scores = torch.matmul(query.float(), key_states.float().transpose(2, 3)) * scaling  # (B, nh, Tq, Tk)
    allowed = _allowed_keys(attention_mask, Tq, Tk, query.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = module.sinks.float().reshape(1, -1, 1, 1).expand(B, nh, Tq, 1)  # (B, nh, Tq, 1)
    probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]  # drop the sink column
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs.to(value_states.dtype), value_states)  # (B, nh, Tq, hd)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


class MegasinkAttention(LlamaAttention):
    """Llama attention plus a per-head sink logit (sink) or a per-head sigmoid gate (gated)."""

    def __init__(self, config: MegasinkConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.variant = getattr(config, "megasink_attention", "sink")
        if self.variant not in VARIANTS:
            raise ValueError(f"megasink_attention={self.variant!r}; allowed: {', '.join(VARIANTS)}")
        n_heads = config.num_attention_heads
        if getattr(config, "megasink_qkv_bias", False):  # Qwen2: q/k/v biases, none on o_proj
            self.q_proj = nn.Linear(config.hidden_size, n_heads * self.head_dim, bias=True)
            kv_dim = config.num_key_value_heads * self.head_dim
            self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
            self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.q_norm = self.k_norm = None
        if getattr(config, "megasink_qk_norm", False):  # Qwen3: RMSNorm per head over head_dim
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.context_limit = getattr(config, "sliding_window", None)  # None: any length
        if self.variant == "sink":
            self.sinks = nn.Parameter(torch.zeros(n_heads))
        else:
            self.head_gate = nn.Linear(config.hidden_size, n_heads, bias=True)

    def _attention_function(self):
        if self.variant == "sink":
            return sink_attention_forward
        impl = self.config._attn_implementation
        if impl in (None, "eager"):
            return eager_attention_forward
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        return ALL_ATTENTION_FUNCTIONS[impl]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, cache_position=None, **kwargs):
        """hidden_states (B, T, hidden) -> (out (B, T, hidden), attention weights or None)."""
        cache = cache if cache is not None else past_key_values  # transformers 5.x / 4.x name
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, nh, hd)
        key = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, nkv, hd)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, n, T, hd)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key, value = cache.update(key, value, self.layer_idx, cache_kwargs)
        if self.context_limit and key.shape[2] > self.context_limit:
            raise ValueError(f"a context of {key.shape[2]} tokens exceeds sliding_window={self.context_limit}: "
                             "this model was trained with whole-context attention, which equals its source's "
                             "sliding-window attention only up to the window; pass shorter contexts")
        out, weights = self._attention_function()(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # out (B, T, nh, hd)
        if self.variant == "gated":
            gate = torch.sigmoid(self.head_gate(hidden_states).float())  # (B, T, nh)
            out = out * gate[..., None].to(out.dtype)
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return self.o_proj(out), weights


class MegasinkDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MegasinkConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = MegasinkAttention(config, layer_idx)


class MegasinkPreTrainedModel(LlamaPreTrainedModel):
    config_class = MegasinkConfig
    _no_split_modules = ["MegasinkDecoderLayer"]
    # sink attention is computed by its own eager function (it understands eager and sdpa masks);
    # flash-attention and flex masks have other formats, so those backends are not offered.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": MegasinkDecoderLayer, "attentions": MegasinkAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MegasinkAttention) and module.variant == "sink":
            try:  # transformers 5.x: skips tensors already loaded from the checkpoint
                from transformers.initialization import zeros_
            except ImportError:  # transformers 4.x: only missing weights reach _init_weights
                zeros_ = nn.init.zeros_
            zeros_(module.sinks)


class MegasinkModel(MegasinkPreTrainedModel, LlamaModel):
    """LlamaModel with megasink decoder layers (forward, masks and caching are Llama's)."""

    def __init__(self, config: MegasinkConfig):
        MegasinkPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MegasinkDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MegasinkForCausalLM(MegasinkPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MegasinkConfig):
        MegasinkPreTrainedModel.__init__(self, config)
        self.model = MegasinkModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["MegasinkConfig", "MegasinkForCausalLM", "MegasinkModel", "MegasinkPreTrainedModel"]
