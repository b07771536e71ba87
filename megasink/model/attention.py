"""Grouped-query attention with the three gate variants of sink-aware training.

Every head's output is scaled by a gate G[t, h] (DESIGN.md section 1):

- vanilla: G = 1 - A[t, first token of t's document] = -expm1(s0 - lse), s0 = q_t . k_0 * scale.
  Implicit: the output is plain softmax attention; G only measures how much the head does.
- sink:    one learnable logit s_h per head joins the softmax with no value:
           out = O * sigmoid(lse - s_h), G = sigmoid(lse - s_h) (the gpt-oss "sinks").
- gated:   G = sigmoid(x_t . w_h + b_h), one scalar per head from extra q-projection columns,
           out = O * G.

``Attention.forward`` returns the gates, (B, nh_local, T) fp32, or given token weights their
per-head sums, (nh_local,), what importance.py needs (vanilla with the flash backend computes
them inside one op with the kernel: ``FlashVanilla``). Head counts are inferred from the
projection shapes (reshape with -1), so tensor parallelism only swaps in sharded linears and
sharded sink/gate parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from megasink.config import ATTENTION_VARIANTS, ModelConfig
from megasink.model import cpu_fused
from megasink.model.importance import gate_sum
from megasink.model.kernels import (FactoredGrad, SeqInfo, acc_dtype, as_dense, attention_with_lse,
                                     flash_backward, flash_forward, flash_inputs)
from megasink.model.layers import apply_rope


def vanilla_gate(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, seq: SeqInfo, scale: float) -> torch.Tensor:
    """1 - weight on the document's first token. q (B, nh, T, hd), k (B, nkv, T, hd), lse (B, nh, T)."""
    first_idx = None if seq.doc_ids is None else seq.first_idx
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or lse.requires_grad):
        return VanillaGate.apply(q, k, lse, first_idx, scale)
    return -torch.expm1(_log_first_weight(q, k, lse, first_idx, scale))  # measured only


def _log_first_weight(q, k, lse, first_idx, scale):
    """s0 - lse (B, nh, T) in lse's dtype: the log of each token's weight on its document's
    first key, s0 = q[t] . k[first(t)] * scale; ``first_idx`` None: one document per row.
    A fused loop on the CPU (cpu_fused), else PyTorch ops: a batched matrix-vector product
    for one document per row, else token-major (the layout q, k, v have as views of their
    projections), where picking each token's first key is a row copy."""
    if cpu_fused.usable(q, k) and lse.dtype == q.dtype:
        return cpu_fused.log_first_weight(q, k, lse, first_idx, scale)
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    acc = lse.dtype
    if first_idx is None:
        s0 = torch.einsum("bngtd,bnd->bngt", q.unflatten(1, (nkv, nh // nkv)).to(acc), k[:, :, 0].to(acc))
        return s0.reshape(B, nh, T) * scale - lse
    k0 = _first_keys(k, first_idx)  # (B, T, nkv, hd)
    qt = q.transpose(1, 2).unflatten(2, (nkv, nh // nkv))  # (B, T, nkv, g, hd)
    s0 = (qt.to(acc) * k0[:, :, :, None].to(acc)).sum(-1).flatten(2).transpose(1, 2)
    return s0 * scale - lse


def add_first_key_grads_(dq, dk, q, k, w, first_idx) -> None:
    """In place, the gradient of s0[t] = q[t] . k[first(t)] * scale given w = dL/ds0 * scale
    (B, nh, T): dq[t] += w[t] k[first(t)], dk[first(t)] += sum over t's query-head group of
    w[t] q[t]. dq, dk any strides (the kernel's gradients, or zeros). Fused on the CPU; in
    PyTorch ops kv heads broadcast over their query-head group, token-major, and dk by an
    accumulating index_put_ of rows in fp32 or wider (autograd of the plain expression repeats k
    to every query head and scatters along a strided dim: ~10 full-size passes). w a tensor or
    a kernels.FactoredGrad."""
    if cpu_fused.usable(q, k, dq, dk):
        cpu_fused.add_first_key_grads_(dq, dk, q, k, w, first_idx)
        return
    w = as_dense(w).to(q.dtype)
    B, nh, T, hd = q.shape
    nkv = dk.shape[1]
    g = nh // nkv
    if first_idx is None:
        w = w.view(B, nkv, g, T, 1)
        dq.unflatten(1, (nkv, g)).addcmul_(w, k[:, :, None, :1])
        dk[:, :, 0] += (w * q.unflatten(1, (nkv, g))).sum((2, 3))
        return
    k0 = _first_keys(k, first_idx)  # (B, T, nkv, hd)
    wt = w.transpose(1, 2).contiguous().view(B, T, nkv, g, 1)  # token-major, as q, k0
    dq.transpose(1, 2).unflatten(2, (nkv, g)).addcmul_(wt, k0[:, :, :, None])
    acc = acc_dtype(q.dtype)  # a document's terms summed in fp32 for half types, rounded once
    dk0 = (wt.to(acc) * q.transpose(1, 2).unflatten(2, (nkv, g)).to(acc)).sum(3)  # (B, T, nkv, hd)
    starts = torch.zeros_like(dk0).index_put_((torch.arange(B, device=q.device)[:, None], first_idx), dk0,
                                              accumulate=True)  # every token's term onto its document's first key
    dk.transpose(1, 2).add_(starts.to(dk.dtype))


def _flat_first(first_idx: torch.Tensor) -> torch.Tensor:
    """(B * T,) row of each token's document start in a (B * T, ...) token-major view."""
    B, T = first_idx.shape
    return (first_idx + torch.arange(B, device=first_idx.device)[:, None] * T).reshape(-1)


def _first_keys(k: torch.Tensor, first_idx: torch.Tensor) -> torch.Tensor:
    """(B, T, nkv, hd): the key of each token's document start, token-major."""
    B, nkv, T, hd = k.shape
    rows = k.transpose(1, 2).reshape(B * T, nkv * hd)  # a view when k is a projection's view
    return rows.index_select(0, _flat_first(first_idx)).view(B, T, nkv, hd)


class VanillaGate(torch.autograd.Function):
    """G = -expm1(s0 - lse), s0[t] = q[t] . k[first(t)] * scale, with a hand-written backward,
    for kernels whose lse is an autograd output (eager, flex; the flash backend fuses it:
    ``FlashVanilla``): ds0 = -dG * exp(s0 - lse), dlse = -ds0, dq and dk by
    ``add_first_key_grads_``. ``first_idx`` None: one document per row.
    Checked against autograd of the plain expression and eager attention."""

    @staticmethod
    def forward(ctx, q, k, lse, first_idx, scale):
        x = _log_first_weight(q, k, lse, first_idx, scale)
        ctx.save_for_backward(q, k, torch.exp(x))
        ctx.scale, ctx.first_idx = scale, first_idx
        return -torch.expm1(x)  # exact also for gates near 0

    @staticmethod
    def backward(ctx, dgate):
        q, k, p0 = ctx.saved_tensors
        dlse = dgate * p0  # dG/dlse = p0 = -dG/ds0
        dq = torch.zeros_like(q)  # q's strides
        B, nkv, T, hd = k.shape
        dk = q.new_zeros(B, T, nkv, hd).transpose(1, 2)  # token-major, as the CPU loops take it
        add_first_key_grads_(dq, dk, q, k, dlse * -ctx.scale, ctx.first_idx)
        return dq, dk, dlse, None, None


class FlashVanilla(torch.autograd.Function):
    """The fused flash kernel and the vanilla gate's weighted sums as one op:
    (q, k, v, token weights (B, T)) -> (out, S (nh,)), S[h] = sum over t of weight[t] G[t, h].

    Same forward as ``FlashAttentionLSE`` + ``VanillaGate`` + ``importance.gate_sum``; the
    backward takes dO and dS: dG[t, h] = dS[h] weight[t] and dLSE = dG p0 reach the kernel's
    backward (``kernels.flash_backward``, the shifted O) and the gate's q . k0 gradient (added
    in place to the kernel's fresh dq and dk) as a ``FactoredGrad``, which the CPU loops read
    without forming it (the PyTorch ops, CUDA and bf16, form it). The aux loss thus costs no
    zero-filled buffers, gradient sums or autograd nodes of its own."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, first_idx, weights):
        ctx.set_materialize_grads(False)
        out, lse, extras = flash_forward(q, k, v, scale, mask)
        x = _log_first_weight(q, k, lse, first_idx, scale)
        weights = weights.to(x.dtype)
        ctx.save_for_backward(q, k, v, out, lse, torch.exp(x), weights)
        ctx.scale, ctx.mask, ctx.extras, ctx.first_idx = scale, mask, extras, first_idx
        return out, gate_sum(torch.expm1(x).neg_(), weights)  # G = 1 - exp(x), exact also for gates near 0

    @staticmethod
    def backward(ctx, dout, dsums):
        q, k, v, out, lse, p0, weights = ctx.saved_tensors
        dlse = None if dsums is None else FactoredGrad(dsums, weights, p0)  # dG/dlse = p0 = -dG/ds0
        dq, dk, dv = flash_backward(dout, dlse, q, k, v, out, lse, ctx.scale, ctx.mask, ctx.extras)
        if dlse is not None:
            add_first_key_grads_(dq, dk, q, k, dlse._replace(head=dsums * -ctx.scale), ctx.first_idx)
        return dq, dk, dv, None, None, None, None


def flash_vanilla_attention(q, k, v, scale: float, seq: SeqInfo, weights: torch.Tensor):
    """(out (B, nh, T, hd), S (nh,) fp32): flash attention and the sums of its vanilla gate over
    tokens weighted by ``weights`` (B, T), differentiable."""
    q, k, v, mask = flash_inputs(q, k, v, seq)
    return FlashVanilla.apply(q, k, v, scale, mask, None if seq.doc_ids is None else seq.first_idx, weights)


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

    def forward(self, x, cos, sin, seq: SeqInfo, backend: str, weights=None):
        """x (B, T, d) -> (y (B, T, d), g): with token ``weights`` (B, T), g is each head's sum of
        the gate over them, (nh_local,), what importance needs; without, the gate itself,
        (B, nh_local, T); both fp32 (fp64 for an fp64 model). None for a vanilla gate nobody
        reads this step."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, -1, self.q_cols)  # (B, T, nh, hd[+1])
        gate_logits = q[..., hd] if self.variant == "gated" else None  # (B, T, nh)
        q = q[..., :hd]
        k = self.wk(x).view(B, T, -1, hd)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        if self.variant == "vanilla":
            out, g = self._vanilla(q, k, v, seq, backend, weights)
        else:
            out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, scale=self.scale)
            if self.variant == "sink":
                gate = sink_gate(lse, self.sinks)
            else:
                gate = headwise_gate(gate_logits, self.gate_bias)
            out = out * gate[..., None].to(out.dtype)
            g = gate if weights is None else gate_sum(gate, weights)
        y = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y), g

    def _vanilla(self, q, k, v, seq: SeqInfo, backend: str, weights):
        """(out, g) as forward returns them: g differentiable when the aux loss is on, measured
        without a graph when only read, None when nobody reads it."""
        with_grad = torch.is_grad_enabled() and self.gate_needs_grad
        if with_grad and backend == "flash" and weights is not None:  # gate and sums fused into the kernel op
            return flash_vanilla_attention(q, k, v, self.scale, seq, weights)
        out, lse = attention_with_lse(q, k, v, backend=backend, seq=seq, scale=self.scale)
        if not (with_grad or self.measure_gate):
            return out, None  # not measured this step: the caller reads no importance
        with torch.set_grad_enabled(with_grad):
            gate = vanilla_gate(q, k, lse, seq, self.scale)
            return out, gate if weights is None else gate_sum(gate, weights)
