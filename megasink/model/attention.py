"""Grouped-query attention with the three gate variants of sink-aware training.

Every head's output is scaled by a gate G[t, h] (DESIGN.md section 1):

- vanilla: G = 1 - A[t, first token of t's document] = -expm1(s0 - lse), s0 = q_t . k_0 * scale.
  Implicit: the output is plain softmax attention; G only measures how much the head does.
- sink:    one learnable logit s_h per head joins the softmax with no value:
           out = O * sigmoid(lse - s_h), G = sigmoid(lse - s_h) (the gpt-oss "sinks").
- gated:   G = sigmoid(x_t . w_h + b_h), one scalar per head from extra q-projection columns,
           out = O * G.

The gates are returned as (B, nh_local, T) fp32 so importance.py can turn them into
per-head importance. Head counts are inferred from the projection shapes (reshape with -1),
so tensor parallelism only swaps in sharded linears and sharded sink/gate parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from megasink.config import ATTENTION_VARIANTS, ModelConfig
from megasink.model.kernels import SeqInfo, acc_dtype, attention_with_lse
from megasink.model.layers import apply_rope


def vanilla_gate(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, seq: SeqInfo, scale: float) -> torch.Tensor:
    """1 - weight on the document's first token. q (B, nh, T, hd), k (B, nkv, T, hd), lse (B, nh, T)."""
    first_idx = None if seq.doc_ids is None else seq.first_idx
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or lse.requires_grad):
        return VanillaGate.apply(q, k, lse, first_idx, scale)
    return -torch.expm1(_log_first_weight(q, k, lse, first_idx, scale)[0])  # measured only


def _log_first_weight(q, k, lse, first_idx, scale):
    """(s0 - lse (B, nh, T), k0): the log of each token's weight on its document's first key."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    acc = lse.dtype
    k0 = _first_keys(k, first_idx)  # (B, nkv, T or 1, hd)
    qg = q.view(B, nkv, nh // nkv, T, hd).to(acc)
    if first_idx is None:  # one key per row: a batched matrix-vector product
        s0 = torch.einsum("bngtd,bnd->bngt", qg, k0[:, :, 0].to(acc))
    else:
        s0 = torch.einsum("bngtd,bntd->bngt", qg, k0.to(acc))
    return s0.reshape(B, nh, T).mul_(scale).sub_(lse), k0


class VanillaGate(torch.autograd.Function):
    """G = -expm1(s0 - lse), s0[t] = q[t] . k[first(t)] * scale, with a hand-written backward.

    Autograd of the plain expression repeats k0 to every query head and makes ~8 full-size
    passes in the backward; here the kv heads broadcast over their query-head group, and the
    backward is dq = ds0 * k0, dk[first] += sum over the group and the document of ds0 * q,
    dlse = -ds0 with ds0 = -dG * exp(s0 - lse) * scale. ``first_idx`` None: one document per
    row, k0 = k[:, :, 0]. Checked against autograd of the plain expression and eager attention."""

    @staticmethod
    def forward(ctx, q, k, lse, first_idx, scale):
        x, k0 = _log_first_weight(q, k, lse, first_idx, scale)
        ctx.save_for_backward(q, k0, torch.exp(x))
        ctx.scale, ctx.first_idx, ctx.k_shape = scale, first_idx, k.shape
        return -torch.expm1(x)  # exact also for gates near 0

    @staticmethod
    def backward(ctx, dgate):
        q, k0, p0 = ctx.saved_tensors
        B, nh, T, hd = q.shape
        nkv = k0.shape[1]
        dlse = dgate * p0  # dG/dlse = p0 = -dG/ds0
        w = (dlse * -ctx.scale).to(q.dtype).view(B, nkv, nh // nkv, T, 1)  # dL/ds0 * scale
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = (w * k0[:, :, None]).reshape(B, nh, T, hd)
        if ctx.needs_input_grad[1]:
            dk0 = (w * q.view(B, nkv, nh // nkv, T, hd)).sum(2)  # (B, nkv, T, hd), summed over the group
            dk = q.new_zeros(ctx.k_shape)
            if ctx.first_idx is None:
                dk[:, :, 0] = dk0.sum(2)
            else:  # every token's term goes to its document's first key
                dk.scatter_add_(2, ctx.first_idx[:, None, :, None].expand(B, nkv, T, hd), dk0)
        return dq, dk, dlse, None, None


def _first_keys(k: torch.Tensor, first_idx) -> torch.Tensor:
    """Key of each token's document start, (B, nkv, T, hd); (B, nkv, 1, hd) for one document per row."""
    if first_idx is None:
        return k[:, :, :1]
    B, nkv, T, hd = k.shape
    return torch.gather(k, 2, first_idx[:, None, :, None].expand(B, nkv, T, hd))


def sink_gate(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """sigmoid(lse - s_h): the mass the real tokens keep against the sink. lse (B, nh, T)."""
    return torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])


def headwise_gate(gate_logits: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """sigmoid(x . w_h + b_h). gate_logits (B, T, nh) -> (B, nh, T)."""
    acc = acc_dtype(gate_logits.dtype)
    return torch.sigmoid(gate_logits.to(acc) + gate_bias.to(acc)).transpose(1, 2)


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
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.q_cols, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # vanilla's gate changes no output: it needs a gradient only for the aux loss, and it
        # need not be computed at all when nobody reads it (both set by the Transformer)
        self.gate_needs_grad = True
        self.measure_gate = True
        if self.variant == "sink":
            self.sinks = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.sink_init)))
        if self.variant == "gated":
            self.gate_bias = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.gate_bias_init)))

    def forward(self, x, cos, sin, seq: SeqInfo, backend: str):
        """x (B, T, d) -> (y (B, T, d), gate (B, nh_local, T) fp32, or None for an unmeasured vanilla gate)."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, -1, self.q_cols)  # (B, T, nh, hd[+1])
        gate_logits = q[..., hd] if self.variant == "gated" else None  # (B, T, nh)
        q = q[..., :hd]
        k = self.wk(x).view(B, T, -1, hd)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, scale=self.scale)
        if self.variant == "vanilla":
            with_grad = torch.is_grad_enabled() and self.gate_needs_grad
            if with_grad or self.measure_gate:
                with torch.set_grad_enabled(with_grad):
                    gate = vanilla_gate(q, k, lse, seq, self.scale)  # only measured unless the aux loss is on
            else:
                gate = None  # not measured this step: the caller reads no importance
        elif self.variant == "sink":
            gate = sink_gate(lse, self.sinks)
            out = out * gate[..., None].to(out.dtype)
        else:
            gate = headwise_gate(gate_logits, self.gate_bias)
            out = out * gate[..., None].to(out.dtype)
        y = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y), gate
