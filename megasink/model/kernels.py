"""Attention backends that return ``(out, lse)`` with a differentiable log-sum-exp.

All take q (B, nh, T, hd), k/v (B, nkv, T, hd), causal, optional document ids, and
return out (B, nh, T, hd) in q's dtype and lse (B, nh, T) in fp32, natural log.

Why the lse gradient matters (DESIGN.md section 1): the sink gate sigmoid(lse - s) and the
vanilla gate 1 - exp(s0 - lse) depend on lse, so the loss reaches q and k through it and
the attention backward must use dS = P * (dP - D + dLSE). Backends:

- ``eager``: explicit softmax, autograd does it all. The reference; O(T^2) memory.
- ``flash``: a fused flash kernel forward (PyTorch's SDPA flash op on CPU/CUDA) and its own
  backward with ``out`` shifted in one column, O'[:, 0] = O[:, 0] - dLSE / dO[:, 0] per row, so
  that the kernel's D = rowsum(dO * O') becomes D - dLSE and its dS = P (dP - D + dLSE)
  (``_shift_out``; on the CPU in place in one loop, ``cpu_fused``, and undone after). Rows
  with dO[:, 0] = 0 but dLSE != 0 cannot be shifted; then the *augmented-value backward*
  runs: the kernel at head dim hd + 1 with v' = [v, 1], dO' = [dO, dLSE], zeros elsewhere.
  With no lse gradient the plain kernel backward runs.
- ``flex``: FlexAttention with a block mask and ``AuxRequest(lse=True)``; its backward
  carries dLSE, but torch 2.13 has no FlexAttention backward on CPU (CUDA only for training).
- ``sdpa``: the stock fused op with its stock autograd, which drops dLSE. Allowed only where
  no lse gradient is needed (inference, or a variant/loss that never differentiates lse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megasink.model import cpu_fused

BACKENDS = ("auto", "eager", "flex", "sdpa", "flash")


class BackendError(RuntimeError):
    """A backend asked to do something it cannot do correctly."""


@dataclass
class SeqInfo:
    """Per-batch sequence layout shared by all layers: documents, positions, cached masks.

    Build it with ``SeqInfo.build``. Without document ids the batch is one document per row.
    Document id -1 marks padding: it is its own "document" (so no row is empty) and is
    excluded from importance.
    """

    doc_ids: Optional[torch.Tensor]  # (B, T) int64, non-decreasing per row, or None
    positions: torch.Tensor  # (B, T) position within the document (RoPE)
    first_idx: torch.Tensor  # (B, T) index of the first token of each token's document
    valid: torch.Tensor  # (B, T) bool, False on padding
    _cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def build(tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> "SeqInfo":
        B, T = tokens.shape
        ar = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        if doc_ids is None:
            zeros = torch.zeros_like(ar)
            return SeqInfo(None, ar, zeros, torch.ones(B, T, dtype=torch.bool, device=tokens.device))
        if doc_ids.shape != tokens.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}")
        doc_ids = doc_ids.to(tokens.device)
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T)
        return SeqInfo(doc_ids, ar - first, first, doc_ids >= 0)

    def is_doc_start(self) -> torch.Tensor:
        """(B, T) bool: the token is the first of its document (the vanilla sink)."""
        return self.positions == 0

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, T) 0/-inf: causal and same document. Only for kernels that need it."""
        key = ("additive", dtype)
        if key not in self._cache:
            allowed = self.bool_mask()[:, None]  # (B, 1, T, T)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._cache[key] = mask.masked_fill(~allowed, float("-inf"))
        return self._cache[key]

    def bool_mask(self) -> torch.Tensor:
        """(B, T, T) True where query t may attend to key s (causal, same document)."""
        if "bool" not in self._cache:
            d = self.doc_ids
            T = d.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
            self._cache["bool"] = causal & (d[:, :, None] == d[:, None, :])
        return self._cache["bool"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types and fp32, fp64 stays fp64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd), each kv head serving n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# ----------------------------------------------------------------------------- eager


def eager_attention(q, k, v, scale: float, seq: SeqInfo):
    """Explicit softmax in fp32; the numerical reference for every other backend."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    acc = acc_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, nh, T, T)
    if seq.doc_ids is not None:
        allowed = seq.bool_mask()[:, None]  # (B, 1, T, T)
    else:
        T = q.shape[2]
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, nh, T)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)  # (B, nh, T, hd)
    return out, lse


# ----------------------------------------------------------------------------- flash


def flash_forward(q, k, v, scale, mask):
    """Fused forward -> (out, lse, extras for the backward)."""
    is_causal = mask is None
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        return out, lse, ()
    if mask is not None:
        raise BackendError(
            "flash backend on CUDA has no document masking through PyTorch's flash op; "
            "install flash-attn (varlen) or use model.attention_backend=flex"
        )
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _flash_bwd(dout, q, k, v, out, lse, scale, mask, extras):
    is_causal = mask is None
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    cum_q, cum_k, max_q, max_k, seed, offset = extras
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
    )


def _augment(x: torch.Tensor, extra: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """Append `pad` head-dim columns: `extra` (B, nh, T) in the first one (or 0), zeros after."""
    cols = torch.zeros(*x.shape[:-1], pad, dtype=x.dtype, device=x.device)
    if extra is not None:
        cols[..., 0] = extra.to(x.dtype)
    return torch.cat([x, cols], dim=-1).contiguous()


class FlashAttentionLSE(torch.autograd.Function):
    """Fused flash attention whose backward carries the gradient of lse exactly."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask):
        # an lse that nothing depends on must arrive as None in the backward, not as zeros,
        # so the plain kernel backward is taken (found by benchmarks/aux_overhead.py)
        ctx.set_materialize_grads(False)
        out, lse, extras = flash_forward(q, k, v, scale, mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.mask, ctx.extras = scale, mask, extras
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(dout, dlse, q, k, v, out, lse, ctx.scale, ctx.mask, ctx.extras)
        return dq, dk, dv, None, None


class FactoredGrad(NamedTuple):
    """A (B, nh, T) gradient given as head (nh,) x token (B, T) x elem (B, nh, T), as the vanilla
    gate's sums produce it (dLSE = dsum[h] * weight[t] * p0[t, h]): the CPU loops read the
    factors, so it is never materialised there."""

    head: torch.Tensor
    token: torch.Tensor
    elem: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.elem * (self.head[:, None] * self.token[:, None, :]).to(self.elem.dtype)


def flash_backward(dout, dlse, q, k, v, out, lse, scale, mask, extras):
    """(dq, dk, dv) of the fused kernel for output and lse gradients, either of them None;
    ``dlse`` a (B, nh, T) tensor or a ``FactoredGrad``.

    No lse gradient: the kernel's own backward. With one: the same backward with O shifted
    (``_shift_out``), or, for rows it cannot shift, the augmented-value backward."""
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.device.type != "cpu":
        dout = dout.contiguous()
    if dlse is None:  # nothing depends on lse: the kernel's own backward is exact
        return _flash_bwd(dout, q, k, v, out, lse, scale, mask, extras)
    if cpu_fused.usable(out, dout):  # the same shift, in place and undone right after
        column = cpu_fused.shift_first_column_(out, dout, dlse)
        if column is None:
            return _augmented_bwd(dout, as_dense(dlse), q, k, v, out, lse, scale, mask, extras)
        try:
            return _flash_bwd(dout, q, k, v, out, lse, scale, mask, extras)
        finally:
            cpu_fused.restore_first_column_(out, column)
    dlse = as_dense(dlse)
    out_shifted = _shift_out(out, dout, dlse)
    if out_shifted is not None:
        return _flash_bwd(dout, q, k, v, out_shifted, lse, scale, mask, extras)
    return _augmented_bwd(dout, dlse, q, k, v, out, lse, scale, mask, extras)


def as_dense(g):
    """A (B, nh, T) gradient given as a tensor or a ``FactoredGrad``, as a tensor."""
    return g.dense() if isinstance(g, FactoredGrad) else g


def _shift_out(out, dout, dlse):
    """O with its first column shifted per row, O'[:, 0] = O[:, 0] - dLSE / dO[:, 0], or None
    when a row with dLSE != 0 has dO[:, 0] = 0 (or a shift too large for out's dtype).

    Flash backward kernels read ``out`` only through D = rowsum(dO * O) and compute
    dS = P (dP - D). With O' in its place D' = D - dLSE, so the kernel's own backward yields
    dS = P (dP - D + dLSE): the lse gradient, exactly, at the kernel's head dim, for any
    number of kv heads, for the price of one copy of O. Rounding: the shifted product
    dO0 * O'0 = dO0 * O0 - dLSE is exact up to O'0's rounding, |error| <= eps (|dO0 O0| + |dLSE|)
    in out's dtype, as for the augmented column, however small dO0 is."""
    acc = acc_dtype(out.dtype)
    delta = dlse.to(acc) / dout[..., 0].to(acc)  # (B, nh, T); the column read is strided: once
    delta.masked_fill_(dlse == 0, 0.0)  # rows without dLSE stay as they are (also at dO0 = 0: 0 / 0)
    # |O'0| must stay finite in out's dtype: no row with dLSE != 0 at dO0 = 0 (inf), no NaN
    if not bool(delta.abs().max() <= torch.finfo(out.dtype).max / 4):
        return None
    shifted = out.clone()  # same strides as out
    shifted[..., 0].sub_(delta)
    return shifted


def _augmented_bwd(dout, dlse, q, k, v, out, lse, scale, mask, extras):
    """The kernel backward at head dim hd + 1: v' = [v, 1], dO' = [dO, dLSE], q', k', O' padded
    with 0, which adds dLSE to dP and leaves D unchanged. Exact for every row, incl. dO = 0."""
    B, nkv, T, hd = k.shape
    n_rep = q.shape[1] // nkv
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)  # the extra column is per query head
    pad = 1 if q.device.type == "cpu" else 8 - hd % 8 or 8  # CUDA kernels need hd % 8 == 0
    v_aug = _augment(v, torch.ones_like(lse), pad)  # v' = [v, 1, 0...]
    dout_aug = _augment(dout, dlse, pad)  # dO' = [dO, dLSE, 0...]
    q_aug, k_aug, out_aug = _augment(q, None, pad), _augment(k, None, pad), _augment(out, None, pad)
    dq, dk, dv = _flash_bwd(dout_aug, q_aug, k_aug, v_aug, out_aug, lse, scale, mask, extras)
    dk, dv = (g[..., :hd].reshape(B, nkv, n_rep, T, hd).sum(2) for g in (dk, dv))  # back to kv heads
    return dq[..., :hd], dk, dv


def flash_inputs(q, k, v, seq: SeqInfo):
    """(q, k, v, mask) as the fused kernel takes them.

    The CPU op takes fewer kv heads (GQA) and q, k, v as strided views of the (B, T, n, hd)
    projections (bitwise the same results; its out and grads come back in that layout, so
    the transpose back to (B, T, nh * hd) is free as well). CUDA kernels want them contiguous
    with one kv head per query head."""
    if q.device.type != "cpu":
        n_rep = q.shape[1] // k.shape[1]
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = seq.additive_mask(q.dtype) if seq.doc_ids is not None else None
    return q, k, v, mask


def flash_attention(q, k, v, scale: float, seq: SeqInfo):
    q, k, v, mask = flash_inputs(q, k, v, seq)
    return FlashAttentionLSE.apply(q, k, v, scale, mask)


# ----------------------------------------------------------------------------- sdpa (no dLSE)


def sdpa_attention(q, k, v, scale: float, seq: SeqInfo):
    """Stock fused op and autograd: out is differentiable, lse is a constant (detached)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    mask = seq.additive_mask(q.dtype) if seq.doc_ids is not None else None
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
        )
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, mask is None, scale=scale
        )[:2]
        lse = lse[..., : q.shape[2]]  # the CUDA kernel pads lse's length to a multiple of 32
    return out, lse.detach()


# ----------------------------------------------------------------------------- flex


_FLEX_COMPILED = None


def flex_attention_lse(q, k, v, scale: float, seq: SeqInfo):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    global _FLEX_COMPILED
    B, _, T, _ = q.shape
    doc = seq.doc_ids

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if doc is None:
            return causal
        return causal & (doc[b, q_idx] == doc[b, kv_idx])

    block_mask = create_block_mask(mask_mod, B if doc is not None else None, None, T, T, device=q.device)
    fn = flex_attention
    if q.device.type == "cuda":
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX_COMPILED
    enable_gqa = q.shape[1] != k.shape[1]
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                  return_aux=AuxRequest(lse=True))
    return out, aux.lse.to(acc_dtype(q.dtype))


# ----------------------------------------------------------------------------- dispatch

_IMPLS = {"eager": eager_attention, "flash": flash_attention, "sdpa": sdpa_attention,
          "flex": flex_attention_lse}


def resolve_backend(name: str, device: torch.device, needs_lse_grad: bool) -> str:
    """Pick the concrete backend for `name` on `device`; refuse incorrect combinations.

    `needs_lse_grad`: a gradient will be taken and the loss depends on lse.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash"  # fused forward + exact augmented backward, CPU and CUDA
    if name == "sdpa" and needs_lse_grad:
        raise BackendError(
            "attention_backend=sdpa drops the gradient of the log-sum-exp, which this loss needs "
            "(sink attention always; vanilla attention with aux_loss.coef > 0). "
            "Use attention_backend=flash (or auto) to train, sdpa only for inference."
        )
    if name == "flex" and needs_lse_grad and device.type == "cpu":
        raise BackendError(
            "attention_backend=flex cannot train on CPU: torch has no FlexAttention backward on CPU. "
            "Use attention_backend=flash (or auto)."
        )
    return name


def attention_with_lse(q, k, v, *, backend: str, seq: SeqInfo, scale: Optional[float] = None):
    """Causal (and document-masked) attention -> (out (B, nh, T, hd), lse (B, nh, T) fp32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _IMPLS[backend](q, k, v, scale, seq)
