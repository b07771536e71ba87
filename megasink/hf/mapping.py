"""Name and config mappings between megasink's Transformer and Llama-family Hugging Face models
(Llama, Mistral, Qwen2, Qwen3: one weight layout; docs/design.md, "Models from Hugging Face").

    megasink                               Hugging Face (Llama layout)
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.attention.wq.weight           model.layers.N.self_attn.q_proj.weight
    layers.N.attention.wk / wv / wo        model.layers.N.self_attn.k_proj / v_proj / o_proj
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    layers.N.feed_forward.w1 / w3 / w2     model.layers.N.mlp.gate_proj / up_proj / down_proj
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (absent when the embeddings are tied)
    layers.N.attention.wq / wk / wv.bias   model.layers.N.self_attn.q_proj / k_proj / v_proj.bias (Qwen2)
    layers.N.attention.q_norm / k_norm     model.layers.N.self_attn.q_norm / k_norm.weight        (Qwen3)
    layers.N.attention.sinks               model.layers.N.self_attn.sinks            (sink)
    wq's gate rows, gate_bias              model.layers.N.self_attn.head_gate.weight / .bias (gated)

Gated attention: megasink's wq has hd + 1 rows per head, (nh, hd + 1, d); the first hd rows
of each head are its query, the last its gate logit. HF splits them into q_proj (nh * hd, d)
and head_gate (nh, d) with the gate bias as head_gate.bias. With q/k/v biases, wq's bias has the
same per-head layout, (nh, hd + 1): its last entry per head is the gate bias. Both directions are
exact copies.

RoPE (rotate-half, with linear or llama3 frequency scaling), RMSNorm and SwiGLU are the same
functions in both, so a vanilla model is its family's stock class (``model.hf_family``: Llama,
Mistral, Qwen2 or Qwen3); sink and gated models use the modeling code in ``megasink/hf/remote/``
shipped with the export.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from megasink.config import HF_FAMILIES, ModelConfig

REMOTE_MODEL_TYPE = "megasink"
AUTO_MAP = {
    "AutoConfig": "configuration_megasink.MegasinkConfig",
    "AutoModelForCausalLM": "modeling_megasink.MegasinkForCausalLM",
}
# model.hf_family -> the stock transformers class of a vanilla export (the family is its model_type)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
assert set(ARCHITECTURES) == set(HF_FAMILIES), "config.HF_FAMILIES and mapping.ARCHITECTURES disagree"
SUPPORTED_MODEL_TYPES = (*HF_FAMILIES, REMOTE_MODEL_TYPE)
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # HF rope_type -> model.rope_scaling

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


def _rope_parameters(m: ModelConfig) -> dict:
    """HF rope_parameters of model config ``m`` (rope_type default, linear or llama3)."""
    params = {"rope_type": {v: k for k, v in ROPE_TYPES.items()}[m.rope_scaling], "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        params["factor"] = m.rope_factor
    if m.rope_scaling == "llama3":
        params.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                      original_max_position_embeddings=m.rope_original_seq_len)
    return params


def _family_keys(m: ModelConfig) -> dict:
    """config.json keys of a vanilla export's family (model.hf_family), beyond the common ones."""
    if m.hf_family == "mistral":
        return {"sliding_window": m.sliding_window or None}
    if m.hf_family == "qwen2":  # q/k/v biases are built in; no sliding-window layers
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers}
    if m.hf_family == "qwen3":  # QK-norm is built in; attention_bias would bias o_proj too
        return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": m.n_layers}
    return {"attention_bias": False, "mlp_bias": False}  # llama


def hf_config_dict(m: ModelConfig, token_ids: Optional[dict] = None, dtype: str = "float32") -> dict:
    """config.json contents for model config ``m``: its family's stock model for vanilla, megasink
    remote code (a Llama config plus megasink_* feature keys) for sink and gated."""
    token_ids = token_ids or {}
    rope = _rope_parameters(m)
    cfg = {
        "architectures": [ARCHITECTURES[m.hf_family]],
        "model_type": m.hf_family,
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
        "rope_theta": m.rope_theta,  # transformers 4.x reads this (and rope_scaling) ...
        "rope_scaling": rope if m.rope_scaling != "none" else None,
        "rope_parameters": rope,  # ... and 5.x this
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        # no pad_token_id here: Llama would give the embedding a padding_idx (a zero gradient row)
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if m.attention == "vanilla":
        cfg.update(_family_keys(m))
    else:
        cfg.update(architectures=["MegasinkForCausalLM"], model_type=REMOTE_MODEL_TYPE, auto_map=dict(AUTO_MAP),
                   attention_bias=False, mlp_bias=False, megasink_attention=m.attention,
                   megasink_hf_family=m.hf_family, megasink_qkv_bias=m.qkv_bias, megasink_qk_norm=m.qk_norm,
                   sliding_window=m.sliding_window or None)
    return cfg


def _split_gated_wq(wq: torch.Tensor, n_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wq's weight (nh * (hd + 1), d) or bias (nh * (hd + 1),) -> q part (nh * hd, ...), gate part (nh, ...)."""
    rest = wq.shape[1:]
    w = wq.view(n_heads, head_dim + 1, *rest)  # (nh, hd + 1, ...)
    return w[:, :head_dim].reshape(n_heads * head_dim, *rest), w[:, head_dim]


def _join_gated_wq(q: torch.Tensor, gate: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q part (nh * hd, ...), gate part (nh, ...) -> (nh * (hd + 1), ...) in megasink's per-head layout."""
    rest = q.shape[1:]
    w = torch.cat([q.view(n_heads, head_dim, *rest), gate.view(n_heads, 1, *rest)], dim=1)  # (nh, hd + 1, ...)
    return w.reshape(n_heads * (head_dim + 1), *rest)


def to_hf_tensors(sd: dict, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for a megasink state dict (one tensor at a time, for progress bars)."""
    for key, hf_key in _GLOBAL_MAP.items():
        if key == "output.weight" and m.tie_embeddings:
            continue
        yield hf_key, sd[key]
    for i in range(m.n_layers):
        pre, hf_pre = f"layers.{i}.attention.", f"model.layers.{i}."
        for key, hf_key in _LAYER_MAP.items():
            yield hf_pre + hf_key, sd[f"layers.{i}.{key}"]
        attn = hf_pre + "self_attn."
        wq, bq = sd[pre + "wq.weight"], sd[pre + "wq.bias"] if m.qkv_bias else None
        if m.attention == "gated":
            q, gate = _split_gated_wq(wq, m.n_heads, m.head_dim)
            yield attn + "q_proj.weight", q
            yield attn + "head_gate.weight", gate
            if m.qkv_bias:
                bq, gate_bias = _split_gated_wq(bq, m.n_heads, m.head_dim)
            else:
                gate_bias = sd[pre + "gate_bias"]
            yield attn + "head_gate.bias", gate_bias
        else:
            yield attn + "q_proj.weight", wq
        if m.qkv_bias:
            yield attn + "q_proj.bias", bq
            yield attn + "k_proj.bias", sd[pre + "wk.bias"]
            yield attn + "v_proj.bias", sd[pre + "wv.bias"]
        if m.qk_norm:
            yield attn + "q_norm.weight", sd[pre + "q_norm.weight"]
            yield attn + "k_norm.weight", sd[pre + "k_norm.weight"]
        if m.attention == "sink":
            yield attn + "sinks", sd[pre + "sinks"]


# --------------------------------------------------------------------------- HF -> megasink


def _get(hf_cfg: dict, key: str, default=None):
    value = hf_cfg.get(key, default)
    return default if value is None else value


def hf_family(hf_cfg: dict) -> str:
    """The family (model.hf_family) of a checked config: its model_type, or a megasink export's record."""
    mt = hf_cfg.get("model_type")
    return hf_cfg.get("megasink_hf_family", "llama") if mt == REMOTE_MODEL_TYPE else mt


def _rope(hf_cfg: dict, where: str) -> dict:
    """The model.rope_* fields of a config with default, linear or llama3 RoPE on whole heads; anything
    else is refused by name. rope_scaling (transformers 4.x, and the Hub's Llama 3.1 files) wins over
    rope_parameters, as in transformers."""
    params = hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {}
    params = params if isinstance(params, dict) else {}
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"{where}: RoPE parameters per layer type ({sorted(params)}) are not supported: "
                                    "megasink uses one RoPE for every layer")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: RoPE type {rope_type!r} ({params}) is not supported: megasink implements "
            f"{', '.join(ROPE_TYPES)} (model.rope_scaling); convert a model with one of those")
    partial = params.get("partial_rotary_factor", hf_cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"{where}: partial_rotary_factor={partial}; megasink rotates whole heads")
    out = {"rope_theta": float(params.get("rope_theta") or _get(hf_cfg, "rope_theta", 10000.0)),
           "rope_scaling": ROPE_TYPES[rope_type]}
    try:
        if rope_type != "default":
            out["rope_factor"] = float(params["factor"])
        if rope_type == "llama3":
            out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                       rope_high_freq_factor=float(params["high_freq_factor"]),
                       rope_original_seq_len=int(params.get("original_max_position_embeddings")
                                                 or hf_cfg["max_position_embeddings"]))
    except KeyError as e:
        raise UnsupportedModelError(f"{where}: RoPE type {rope_type!r} without its parameter {e}") from e
    return out


def _sliding_window(hf_cfg: dict, where: str) -> int:
    """Mistral's model-wide window (0: none), recorded as model.sliding_window; sliding windows on some
    layers (Qwen2 / Qwen3 use_sliding_window, layer_types) are refused by name."""
    if hf_family(hf_cfg) == "mistral":
        return int(_get(hf_cfg, "sliding_window", 0))
    types = hf_cfg.get("layer_types")
    sliding = any(t != "full_attention" for t in types) if types else _get(hf_cfg, "use_sliding_window", False)
    if sliding:
        raise UnsupportedModelError(
            f"{where}: sliding-window attention on some layers (use_sliding_window / layer_types) is not supported: "
            "megasink attends to the whole causal context (only Mistral's model-wide sliding_window is accepted, "
            "with model.seq_len at most the window); convert a config with use_sliding_window false")
    return 0


def _check_attention_extras(hf_cfg: dict, where: str, names: set) -> None:
    """Biases and norms inside attention: q/k/v biases are Qwen2's, q/k norms Qwen3's; nothing else."""
    family = hf_family(hf_cfg)
    if _get(hf_cfg, "attention_bias", False) or any(n.endswith("o_proj.bias") for n in names):
        raise UnsupportedModelError(
            f"{where}: attention_bias=true (biases on q/k/v and on o_proj) is not supported: megasink's output "
            "projection has no bias, and q/k/v biases only as the Qwen2 family has them (model.qkv_bias)")
    if family != "qwen2" and any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names):
        raise UnsupportedModelError(f"{where}: q/k/v biases in a {family} checkpoint; megasink reads them only "
                                    "from Qwen2-family models (model.qkv_bias)")
    if family != "qwen3" and any(n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) for n in names):
        raise UnsupportedModelError(f"{where}: per-head q/k norms (QK-norm) in a {family} checkpoint; megasink reads "
                                    "them only from Qwen3-family models (model.qk_norm)")
    if _get(hf_cfg, "mlp_bias", False):
        raise UnsupportedModelError(f"{where}: mlp_bias=true; megasink's SwiGLU has no biases")


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
    if mt == REMOTE_MODEL_TYPE and hf_cfg.get("megasink_attention") not in ("sink", "gated"):
        raise UnsupportedModelError(f"{where}: megasink_attention={hf_cfg.get('megasink_attention')!r} "
                                    "is not sink or gated")
    if hf_family(hf_cfg) not in HF_FAMILIES:
        raise UnsupportedModelError(f"{where}: megasink_hf_family={hf_family(hf_cfg)!r}; allowed: "
                                    f"{', '.join(HF_FAMILIES)}")
    _check_attention_extras(hf_cfg, where, set(weight_names))
    act = _get(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={act!r}; megasink's SwiGLU uses silu")
    _sliding_window(hf_cfg, where)
    _rope(hf_cfg, where)


def source_variant(hf_cfg: dict) -> str:
    """The attention variant a HF config describes: vanilla for Llama-family, else sink/gated."""
    return hf_cfg["megasink_attention"] if hf_cfg.get("model_type") == REMOTE_MODEL_TYPE else "vanilla"


def model_config_from_hf(hf_cfg: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """megasink ModelConfig equivalent to a (checked) Llama-family HF config, plus overrides."""
    heads, hidden = hf_cfg["num_attention_heads"], hf_cfg["hidden_size"]
    kv = _get(hf_cfg, "num_key_value_heads", heads)
    head_dim = _get(hf_cfg, "head_dim", hidden // heads)
    family = hf_family(hf_cfg)
    fields = dict(
        attention=source_variant(hf_cfg),
        n_layers=hf_cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=0 if kv == heads else kv,
        d_model=hidden,
        d_head=0 if head_dim * heads == hidden else head_dim,
        d_ff=hf_cfg["intermediate_size"],
        vocab_size=hf_cfg["vocab_size"],
        seq_len=_get(hf_cfg, "max_position_embeddings", 2048),
        **_rope(hf_cfg, where),
        norm_eps=float(_get(hf_cfg, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", False)),
        init_std=float(_get(hf_cfg, "initializer_range", 0.02)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window(hf_cfg, where),
        hf_family=family,
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
        pre, attn = f"layers.{i}.attention.", f"model.layers.{i}.self_attn."
        for key, hf_key in _LAYER_MAP.items():
            out[f"layers.{i}.{key}"] = take(f"model.layers.{i}.{hf_key}")
        q = take(attn + "q_proj.weight")
        bq = take(attn + "q_proj.bias") if m.qkv_bias else None
        if m.attention == "gated":
            if src_variant == "gated":
                gate_w, gate_b = take(attn + "head_gate.weight"), take(attn + "head_gate.bias")
            else:  # added gates: sigmoid(b) everywhere, wo divided by it
                gate_w, gate_b = torch.zeros(m.n_heads, m.d_model), torch.full((m.n_heads,), float(m.gate_bias_init))
                out[pre + "wo.weight"] /= torch.sigmoid(torch.tensor(float(m.gate_bias_init))).item()
            q = _join_gated_wq(q, gate_w, m.n_heads, m.head_dim)
            if m.qkv_bias:  # the gate bias is wq's bias entry of each head's gate column
                bq = _join_gated_wq(bq, gate_b, m.n_heads, m.head_dim)
            else:
                out[pre + "gate_bias"] = gate_b
        out[pre + "wq.weight"] = q
        if m.qkv_bias:
            out[pre + "wq.bias"], out[pre + "wk.bias"], out[pre + "wv.bias"] = (
                bq, take(attn + "k_proj.bias"), take(attn + "v_proj.bias"))
        if m.qk_norm:
            out[pre + "q_norm.weight"], out[pre + "k_norm.weight"] = take(attn + "q_norm.weight"), take(
                attn + "k_norm.weight")
        if m.attention == "sink":
            out[pre + "sinks"] = (take(attn + "sinks") if src_variant == "sink"
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
