"""Name and config mappings between megasink's Transformer and Llama-family Hugging Face models.

    megasink                               Hugging Face (Llama layout)
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.attention.wq.weight           model.layers.N.self_attn.q_proj.weight
    layers.N.attention.wk / wv / wo        model.layers.N.self_attn.k_proj / v_proj / o_proj
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    layers.N.feed_forward.w1 / w3 / w2     model.layers.N.mlp.gate_proj / up_proj / down_proj
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (absent when the embeddings are tied)
    layers.N.attention.sinks               model.layers.N.self_attn.sinks            (sink)
    wq's gate rows, gate_bias              model.layers.N.self_attn.head_gate.weight / .bias (gated)

Gated attention: megasink's wq has hd + 1 rows per head, (nh, hd + 1, d); the first hd rows
of each head are its query, the last its gate logit. HF splits them into q_proj (nh * hd, d)
and head_gate (nh, d) with the gate bias as head_gate.bias. Both directions are exact copies.

RoPE (rotate-half), RMSNorm and SwiGLU are the same functions in both, so a vanilla model
is a stock ``LlamaForCausalLM``; sink and gated models use the modeling code in
``megasink/hf/remote/`` shipped with the export.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from megasink.config import ModelConfig

REMOTE_MODEL_TYPE = "megasink"
AUTO_MAP = {
    "AutoConfig": "configuration_megasink.MegasinkConfig",
    "AutoModelForCausalLM": "modeling_megasink.MegasinkForCausalLM",
}
# model_type -> family name used in messages; all share the Llama weight layout.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", REMOTE_MODEL_TYPE)

_LAYER_MAP = {  # megasink suffix -> HF suffix, per layer, for every variant
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnsupportedModelError(ValueError):
    """A Hugging Face checkpoint that megasink's model cannot represent (names the feature)."""


# --------------------------------------------------------------------------- megasink -> HF


def hf_config_dict(m: ModelConfig, token_ids: Optional[dict] = None, dtype: str = "float32") -> dict:
    """config.json contents for model config ``m`` (Llama for vanilla, megasink remote code otherwise)."""
    token_ids = token_ids or {}
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # ... and 5.x this
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": m.init_std,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        # no pad_token_id here: Llama would give the embedding a padding_idx (a zero gradient row)
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if m.attention != "vanilla":
        cfg.update(architectures=["MegasinkForCausalLM"], model_type=REMOTE_MODEL_TYPE,
                   megasink_attention=m.attention, auto_map=dict(AUTO_MAP))
    return cfg


def _split_gated_wq(wq: torch.Tensor, n_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nh * (hd + 1), d) -> q (nh * hd, d), gate rows (nh, d)."""
    w = wq.view(n_heads, head_dim + 1, -1)  # (nh, hd + 1, d)
    return w[:, :head_dim].reshape(n_heads * head_dim, -1), w[:, head_dim]


def _join_gated_wq(q: torch.Tensor, gate: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q (nh * hd, d), gate rows (nh, d) -> (nh * (hd + 1), d) in megasink's per-head layout."""
    w = torch.cat([q.view(n_heads, head_dim, -1), gate[:, None, :]], dim=1)  # (nh, hd + 1, d)
    return w.reshape(n_heads * (head_dim + 1), -1)


def to_hf_tensors(sd: dict, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for a megasink state dict (one tensor at a time, for progress bars)."""
    for key, hf_key in _GLOBAL_MAP.items():
        if key == "output.weight" and m.tie_embeddings:
            continue
        yield hf_key, sd[key]
    for i in range(m.n_layers):
        pre, hf_pre = f"layers.{i}.", f"model.layers.{i}."
        for key, hf_key in _LAYER_MAP.items():
            yield hf_pre + hf_key, sd[pre + key]
        wq = sd[pre + "attention.wq.weight"]
        if m.attention == "gated":
            q, gate = _split_gated_wq(wq, m.n_heads, m.head_dim)
            yield hf_pre + "self_attn.q_proj.weight", q
            yield hf_pre + "self_attn.head_gate.weight", gate
            yield hf_pre + "self_attn.head_gate.bias", sd[pre + "attention.gate_bias"]
        else:
            yield hf_pre + "self_attn.q_proj.weight", wq
        if m.attention == "sink":
            yield hf_pre + "self_attn.sinks", sd[pre + "attention.sinks"]


# --------------------------------------------------------------------------- HF -> megasink


def _get(hf_cfg: dict, key: str, default=None):
    value = hf_cfg.get(key, default)
    return default if value is None else value


def _rope(hf_cfg: dict, where: str) -> float:
    """rope_theta of a config with default (unscaled, full-head) RoPE; anything else is an error."""
    params = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    params = params if isinstance(params, dict) else {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(
            f"{where}: RoPE type {rope_type!r} ({params}) is not supported: megasink implements plain "
            "RoPE only (rope_type 'default'); convert a model without RoPE scaling")
    partial = params.get("partial_rotary_factor", hf_cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"{where}: partial_rotary_factor={partial}; megasink rotates whole heads")
    return float(params.get("rope_theta") or _get(hf_cfg, "rope_theta", 10000.0))


def check_supported(hf_cfg: dict, where: str, weight_names=()) -> None:
    """Raise UnsupportedModelError naming the first feature megasink's model lacks."""
    mt = hf_cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {mt!r} is not supported; megasink imports Llama-family checkpoints "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    missing = [k for k in _REQUIRED_KEYS if hf_cfg.get(k) is None]
    if missing:
        raise UnsupportedModelError(f"{where}: config.json lacks {', '.join(missing)}")
    names = set(weight_names)
    if mt == "qwen3" or any(n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for n in names):
        raise UnsupportedModelError(
            f"{where}: this checkpoint normalises queries and keys per head (q_norm / k_norm, 'QK-norm', as "
            "Qwen3 does); megasink's attention has no QK-norm, so the model cannot be represented. "
            "Missing feature: QK-norm in megasink/model/attention.py")
    if mt == "qwen2" or _get(hf_cfg, "attention_bias", False) or any(
            n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")) for n in names):
        raise UnsupportedModelError(
            f"{where}: this checkpoint has biases on the attention projections (q/k/v_proj.bias, as Qwen2 "
            "has); megasink's attention projections have no bias. Missing feature: attention "
            "projection biases in megasink/model/attention.py")
    if _get(hf_cfg, "mlp_bias", False):
        raise UnsupportedModelError(f"{where}: mlp_bias=true; megasink's SwiGLU has no biases")
    act = _get(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={act!r}; megasink's SwiGLU uses silu")
    sliding = (_get(hf_cfg, "use_sliding_window", False)
               or (mt == "mistral" and hf_cfg.get("sliding_window") is not None)
               or any(t != "full_attention" for t in (hf_cfg.get("layer_types") or [])))
    if sliding:
        raise UnsupportedModelError(
            f"{where}: sliding-window attention (use_sliding_window / sliding_window / layer_types) is not "
            "supported: megasink attends to the whole causal context")
    heads, hidden = hf_cfg["num_attention_heads"], hf_cfg["hidden_size"]
    head_dim = _get(hf_cfg, "head_dim", hidden // heads)
    if head_dim * heads != hidden:
        raise UnsupportedModelError(
            f"{where}: head_dim={head_dim} with {heads} heads != hidden_size={hidden}; megasink derives "
            "head_dim = d_model / n_heads. Missing feature: an explicit head_dim")
    if mt == REMOTE_MODEL_TYPE and hf_cfg.get("megasink_attention") not in ("sink", "gated"):
        raise UnsupportedModelError(f"{where}: megasink_attention={hf_cfg.get('megasink_attention')!r} "
                                    "is not sink or gated")
    _rope(hf_cfg, where)


def source_variant(hf_cfg: dict) -> str:
    """The attention variant a HF config describes: vanilla for Llama-family, else sink/gated."""
    return hf_cfg["megasink_attention"] if hf_cfg.get("model_type") == REMOTE_MODEL_TYPE else "vanilla"


def model_config_from_hf(hf_cfg: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """megasink ModelConfig equivalent to a (checked) Llama-family HF config, plus overrides."""
    heads = hf_cfg["num_attention_heads"]
    kv = _get(hf_cfg, "num_key_value_heads", heads)
    fields = dict(
        attention=source_variant(hf_cfg),
        n_layers=hf_cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=0 if kv == heads else kv,
        d_model=hf_cfg["hidden_size"],
        d_ff=hf_cfg["intermediate_size"],
        vocab_size=hf_cfg["vocab_size"],
        seq_len=_get(hf_cfg, "max_position_embeddings", 2048),
        rope_theta=_rope(hf_cfg, where),
        norm_eps=float(_get(hf_cfg, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", False)),
        init_std=float(_get(hf_cfg, "initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def from_hf_tensors(hf_sd: dict, m: ModelConfig, src_variant: str, where: str = "checkpoint") -> dict:
    """megasink state dict (fp32) from HF tensors of variant ``src_variant`` into config ``m``.

    A vanilla source may become sink (sinks = m.sink_init; the importer then calibrates them per
    head) or gated: gate rows 0 and gate bias b = m.gate_bias_init make every gate sigmoid(b), and
    the output projection is divided by sigmoid(b), so the model computes the same function for any
    b (exactly for the default b = 0: a gate of 1/2 and a doubled wo are powers of two).
    """
    if src_variant != "vanilla" and src_variant != m.attention:
        raise UnsupportedModelError(
            f"{where}: a {src_variant} model cannot become {m.attention} without changing what it computes; "
            f"convert it as {src_variant}")

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise UnsupportedModelError(f"{where}: missing tensor {name!r}")
        return hf_sd[name].float()

    out = {key: take(hf_key) for key, hf_key in _GLOBAL_MAP.items() if key != "output.weight"}
    if not m.tie_embeddings:
        out["output.weight"] = take("lm_head.weight") if "lm_head.weight" in hf_sd else out["tok_embeddings.weight"]
    for i in range(m.n_layers):
        pre, hf_pre = f"layers.{i}.", f"model.layers.{i}."
        for key, hf_key in _LAYER_MAP.items():
            out[pre + key] = take(hf_pre + hf_key)
        q = take(hf_pre + "self_attn.q_proj.weight")
        if m.attention == "gated":
            if src_variant == "gated":
                gate_w = take(hf_pre + "self_attn.head_gate.weight")
                out[pre + "attention.gate_bias"] = take(hf_pre + "self_attn.head_gate.bias")
            else:
                gate_w = torch.zeros(m.n_heads, m.d_model)
                out[pre + "attention.gate_bias"] = torch.full((m.n_heads,), float(m.gate_bias_init))
                out[pre + "attention.wo.weight"] /= torch.sigmoid(torch.tensor(float(m.gate_bias_init))).item()
            out[pre + "attention.wq.weight"] = _join_gated_wq(q, gate_w, m.n_heads, m.head_dim)
        else:
            out[pre + "attention.wq.weight"] = q
        if m.attention == "sink":
            out[pre + "attention.sinks"] = (take(hf_pre + "self_attn.sinks") if src_variant == "sink"
                                            else torch.full((m.n_heads,), float(m.sink_init)))
    return out


def unused_hf_tensors(hf_names, m: ModelConfig, src_variant: str) -> list[str]:
    """HF tensor names the mapping would not read (rotary caches are ignored)."""
    src_cfg = ModelConfig(**{**m.__dict__, "attention": src_variant})
    expected = {name for name, _ in to_hf_tensors(_shape_only_sd(src_cfg), src_cfg)}
    expected.add("lm_head.weight")
    return sorted(n for n in hf_names if n not in expected and "rotary_emb" not in n)


def _shape_only_sd(m: ModelConfig) -> dict:
    """A dict with every megasink key (values are placeholders of the right leading shape)."""
    from megasink.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(m)
    return dict(model.state_dict())
