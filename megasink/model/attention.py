"""Grouped-query attention with the three gate variants of sink-aware training.

Every head's output is scaled by a gate G[t, h] (docs/design.md, "The method"):

- vanilla: G = 1 - A[t, first token of t's document] = -expm1(s0 - lse), s0 = q_t . k_0 * scale.
  Implicit: the output is plain softmax attention; G only measures how much the head does.
- sink:    one learnable logit s_h per head joins the softmax with no value:
           out = O * sigmoid(lse - s_h), G = sigmoid(lse - s_h) (the gpt-oss "sinks").
- gated:   G = sigmoid(x_t . w_h + b_h), one scalar per head from extra q-projection columns,
           out = O * G.

``Attention.forward`` returns the gates, (B, nh_local, T) fp32, or given token weights their
per-head sums, (nh_local,), what importance.py needs. Head counts are inferred from the
projection shapes (reshape with -1), so tensor parallelism only swaps in sharded linears and
sharded sink/gate parameters.

Source-model features (docs/design.md, "Models from Hugging Face"): ``qkv_bias`` gives q, k and v
biases (Qwen2); with gated attention the gate bias is then wq's bias entry of the gate column (one
parameter per idea, no separate ``gate_bias``). ``qk_norm`` normalises every query and key head
over head_dim before RoPE (Qwen3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megasink.config import ATTENTION_VARIANTS, ModelConfig
from megasink.model.importance import gate_sum
from megasink.model.kernels import SeqInfo, acc_dtype, attention_with_lse
from megasink.model.layers import RMSNorm, apply_rope


def vanilla_gate(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, seq: SeqInfo, scale: float) -> torch.Tensor:
    """G = 1 - A[t, first(t)] = -expm1(s0 - lse), s0[t] = q[t] . k[first(t)] * scale, the weight
    each token keeps off its document's first key. q (B, nh, T, hd), k (B, nkv, T, hd), lse
    (B, nh, T) -> G (B, nh, T) in lse's dtype. Plain ops: autograd (and torch.compile) see it
    all, every route shares it. The product runs in lse's dtype (fp32 for half types)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    acc = lse.dtype
    rows = k.transpose(1, 2).reshape(B * T, nkv, hd)  # token-major, (B*T, nkv, hd)
    starts = (seq.first_idx + torch.arange(B, device=q.device)[:, None] * T).reshape(-1)  # (B*T,)
    k0 = rows.index_select(0, starts).view(B, T, nkv, 1, hd)  # each token's first key
    qt = q.transpose(1, 2).reshape(B, T, nkv, nh // nkv, hd)  # (B, T, nkv, group, hd)
    s0 = (qt.to(acc) * k0.to(acc)).sum(-1).view(B, T, nh).transpose(1, 2)  # (B, nh, T)
    return -torch.expm1(s0 * scale - lse)  # exact also for gates near 0


def sink_gate(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """sigmoid(lse - s_h): the mass the real tokens keep against the sink. lse (B, nh, T)."""
    return torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])


def headwise_gate(gate_logits: torch.Tensor, gate_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """sigmoid(x . w_h + b_h). gate_logits (B, T, nh) -> (B, nh, T); gate_bias None: the logits
    already carry it (wq's bias)."""
    acc = acc_dtype(gate_logits.dtype)
    logits = gate_logits.to(acc) if gate_bias is None else gate_logits.to(acc) + gate_bias.to(acc)
    return torch.sigmoid(logits).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention not in ATTENTION_VARIANTS:
            raise ValueError(f"model.attention={cfg.attention!r}; allowed: {', '.join(ATTENTION_VARIANTS)}")
        self.variant = cfg.attention
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        # gated: each head's q block carries one extra column, its gate logit (hd + 1 per head),
        # so splitting the q projection by head keeps every gate with its head.
        self.q_cols = cfg.head_dim + (1 if self.variant == "gated" else 0)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.q_cols, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        if self.variant == "sink":
            self.sinks = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.sink_init)))
        if self.variant == "gated" and not cfg.qkv_bias:
            self.gate_bias = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.gate_bias_init)))
        if cfg.qkv_bias:
            with torch.no_grad():
                for w in (self.wq, self.wk, self.wv):
                    w.bias.zero_()
                if self.variant == "gated":
                    self.head_gate_bias().fill_(float(cfg.gate_bias_init))

    def head_gate_bias(self) -> torch.Tensor:
        """(nh_local,) each head's gate bias b_h (gated): ``gate_bias``, or with q/k/v biases the gate
        column's entry of wq's bias (a view: writing it writes the parameter)."""
        if self.wq.bias is None:
            return self.gate_bias
        return self.wq.bias.view(-1, self.q_cols)[:, self.head_dim]  # (nh_local, hd + 1) -> gate column

    def forward(self, x, cos, sin, seq: SeqInfo, backend: str, weights=None, *, gate_grad: bool = True,
                measure: bool = True):
        """x (B, T, d) -> (y (B, T, d), g): with token ``weights`` (B, T), g is each head's sum of
        the gate over them, (nh_local,), what importance needs; without, the gate itself,
        (B, nh_local, T); both fp32 (fp64 for an fp64 model).

        Vanilla's gate changes no output, so two arguments say what it is for: ``gate_grad``,
        a loss will differentiate it (the aux loss); ``measure``, someone reads it. Neither:
        it is not computed and g is None. The sink and gated gates are part of the output and
        always come back."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, -1, self.q_cols)  # (B, T, nh, hd[+1])
        gate_logits = q[..., hd] if self.variant == "gated" else None  # (B, T, nh)
        q = q[..., :hd]
        k = self.wk(x).view(B, T, -1, hd)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        if self.variant == "vanilla":
            out, g = self._vanilla(q, k, v, seq, backend, weights, gate_grad and torch.is_grad_enabled(), measure)
        else:
            out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, scale=self.scale,
                                          lse_grad=self.variant == "sink")  # gated: lse unused
            if self.variant == "sink":
                gate = sink_gate(lse, self.sinks)
            else:
                gate = headwise_gate(gate_logits, None if self.wq.bias is not None else self.gate_bias)
            out = out * gate[..., None].to(out.dtype)
            g = gate if weights is None else gate_sum(gate, weights)
        y = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y), g

    def _vanilla(self, q, k, v, seq: SeqInfo, backend: str, weights, with_grad: bool, measure: bool):
        """(out, g) as forward returns them: g differentiable with ``with_grad``, measured
        without a graph when only read, None when nobody reads it."""
        out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, scale=self.scale, lse_grad=with_grad)
        if not (with_grad or measure):
            return out, None  # not measured this step: the caller reads no importance
        with torch.set_grad_enabled(with_grad):
            gate = vanilla_gate(q, k, lse, seq, self.scale)
            return out, gate if weights is None else gate_sum(gate, weights)
