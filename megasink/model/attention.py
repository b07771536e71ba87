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
    """(s0 - lse (B, nh, T), k0): the log of each token's weight on its document's first key.

    k0 is (B, nkv, 1, hd) for one document per row, else token-major (B, T, nkv, hd): the
    layout q, k and v have as views of their projections, in which picking each token's
    first key is a row copy (index_select) and q . k0 a contiguous product."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    acc = lse.dtype
    if first_idx is None:  # one key per row: a batched matrix-vector product
        k0 = k[:, :, :1]
        s0 = torch.einsum("bngtd,bnd->bngt", q.view(B, nkv, nh // nkv, T, hd).to(acc), k0[:, :, 0].to(acc))
        s0 = s0.reshape(B, nh, T)
    else:
        k0 = _first_keys(k, first_idx)  # (B, T, nkv, hd)
        qt = q.transpose(1, 2).reshape(B, T, nkv, nh // nkv, hd)
        s0 = (qt.to(acc) * k0[:, :, :, None].to(acc)).sum(-1).view(B, T, nh).transpose(1, 2)
    return s0 * scale - lse, k0


class VanillaGate(torch.autograd.Function):
    """G = -expm1(s0 - lse), s0[t] = q[t] . k[first(t)] * scale, with a hand-written backward.

    Autograd of the plain expression repeats k0 to every query head and gathers/scatters
    along a strided dim (~10 full-size passes, 0.8 ms each for gather and scatter_add at
    1x8x512x64); here the kv heads broadcast over their query-head group, in token-major
    layout, and the backward is dq = ds0 * k0, dk[first] += sum over the group and the
    document of ds0 * q (index_add of rows), dlse = -ds0, with
    ds0 = -dG * exp(s0 - lse) * scale. ``first_idx`` None: one document per row, k0 = k[:, :, 0].
    Checked against autograd of the plain expression and eager attention."""

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
        nkv = ctx.k_shape[1]
        g = nh // nkv
        dlse = dgate * p0  # dG/dlse = p0 = -dG/ds0
        w = (dlse * -ctx.scale).to(q.dtype)  # dL/ds0 * scale, (B, nh, T)
        dq = dk = None
        if ctx.first_idx is None:
            w = w.view(B, nkv, g, T, 1)
            if ctx.needs_input_grad[0]:
                dq = (w * k0[:, :, None]).reshape(B, nh, T, hd)
            if ctx.needs_input_grad[1]:
                dk = q.new_zeros(ctx.k_shape)
                dk[:, :, 0] = (w * q.view(B, nkv, g, T, hd)).sum((2, 3))
            return dq, dk, dlse, None, None
        wt = w.transpose(1, 2).reshape(B, T, nkv, g, 1)
        if ctx.needs_input_grad[0]:
            dq = (wt * k0[:, :, :, None]).view(B, T, nh, hd).transpose(1, 2)  # q's own layout
        if ctx.needs_input_grad[1]:
            dk0 = (wt * q.transpose(1, 2).reshape(B, T, nkv, g, hd)).sum(3)  # (B, T, nkv, hd)
            dk = q.new_zeros(B * T, nkv * hd).index_add_(0, _flat_first(ctx.first_idx), dk0.view(B * T, -1))
            dk = dk.view(B, T, nkv, hd).transpose(1, 2)  # every token's term on its document's first key
        return dq, dk, dlse, None, None


def _flat_first(first_idx: torch.Tensor) -> torch.Tensor:
    """(B * T,) row of each token's document start in a (B * T, ...) token-major view."""
    B, T = first_idx.shape
    return (first_idx + torch.arange(B, device=first_idx.device)[:, None] * T).reshape(-1)


def _first_keys(k: torch.Tensor, first_idx: torch.Tensor) -> torch.Tensor:
    """(B, T, nkv, hd): the key of each token's document start, token-major."""
    B, nkv, T, hd = k.shape
    rows = k.transpose(1, 2).reshape(B * T, nkv * hd)  # a view when k is a projection's view
    return rows.index_select(0, _flat_first(first_idx)).view(B, T, nkv, hd)


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
