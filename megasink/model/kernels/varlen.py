"""CUDA route: PyTorch's own FlashAttention-2 variable-length kernels
(``aten._flash_attention_forward`` / ``_flash_attention_backward``, stock torch) over packed
documents, with the lse gradient carried by the shared rule (``lse_grad``).

The batch's rows are flattened to (B * T, heads, hd) and cut into documents by cumulative
sequence lengths (``SeqInfo.varlen``), so no attention crosses a document and no (T, T) mask
exists. GQA: the kernel takes fewer kv heads, none repeated. bf16/fp16 only; head dims are
multiples of 8 up to 248: FA2 takes up to 256, and the augmented fallback adds 8 columns (the
kernel's alignment).

The kernels are wrapped as ``torch.library`` custom ops with fake functions, so that
torch.compile traces them as opaque nodes: no graph break at the host sync of the fallback
decision, and no recompile when the number of documents (cu_seqlens' length) changes. Do not
swap in ``torch.nn.attention.varlen.varlen_attn`` or flash-attn's autograd: both drop dLSE.
"""
from __future__ import annotations

from typing import Optional

import torch

from megasink.model.kernels.lse_grad import backward_with_lse_grad
from megasink.model.kernels.seq import BackendError, SeqInfo

_aten = torch.ops.aten
ALIGN = 8  # FA2 head dims are multiples of 8
MAX_HEAD_DIM = 256  # FA2's largest head dim


def kernel_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """The FA2 varlen forward: q (N, nh, hd), k/v (N, nkv, hd) -> (out (N, nh, hd), lse (nh, N) fp32,
    rng_state, unused) as aten returns them (the last two feed its backward)."""
    out, lse, rng_state, unused, _ = _aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
    return out, lse, rng_state, unused


def kernel_bwd(lse, cu_seqlens, max_seqlen: int, scale: float, rng_state, unused):
    """The FA2 varlen backward as ``lse_grad`` takes it: (dout, q, k, v, out) -> (dq, dk, dv)."""
    def bwd(dout, q, k, v, out):
        return _aten._flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen,
                                               max_seqlen, 0.0, True, rng_state, unused, scale=scale)
    return bwd


@torch.library.custom_op("megasink::varlen_fwd", mutates_args=())
def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               scale: float, lse_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kernel_fwd``; ``lse_grad``: whether the backward is to carry dLSE."""
    return kernel_fwd(q, k, v, cu_seqlens, max_seqlen, scale)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, lse_grad):
    # the shapes of aten's own meta function for this op (tests compare them)
    return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64))


@torch.library.custom_op("megasink::varlen_bwd", mutates_args=())
def varlen_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               scale: float, rng_state: torch.Tensor, unused: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); ``dlse`` (nh, N) or None."""
    bwd = kernel_bwd(lse, cu_seqlens, max_seqlen, scale, rng_state, unused)
    dlse = None if dlse is None else dlse.t()  # (N, nh): shaped like out[..., 0]
    return backward_with_lse_grad(bwd, dout.contiguous(), dlse, q, k, v, out, ALIGN)


@varlen_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, rng_state, unused):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.lse_grad = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, *output)


def _backward(ctx, dout, dlse, _drng, _dunused):
    q, k, v, cu_seqlens, out, lse, rng_state, unused = ctx.saved_tensors
    dlse = dlse if ctx.lse_grad else None  # an unused lse arrives as zeros: no shift for it
    dq, dk, dv = varlen_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, rng_state,
                            unused)
    return dq, dk, dv, None, None, None, None


varlen_fwd.register_autograd(_backward, setup_context=_setup)


def varlen_attention(q, k, v, scale: float, seq: SeqInfo, lse_grad: bool = True):
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) -> out (B, nh, T, hd), lse (B, nh, T) fp32; out and
    lse are token-major views, so the (B, T, nh * hd) output projection input is free."""
    B, nh, T, hd = q.shape
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise BackendError(f"attention_backend=varlen (FlashAttention-2) needs bf16 or fp16 activations, got "
                           f"{q.dtype}: train with train.precision=bf16, or use attention_backend=flex or eager")
    if q.is_cuda and (hd % ALIGN or hd + ALIGN > MAX_HEAD_DIM):
        raise BackendError(f"attention_backend=varlen (FlashAttention-2) takes head dims that are multiples of "
                           f"{ALIGN} up to {MAX_HEAD_DIM - ALIGN} (FA2 stops at {MAX_HEAD_DIM}; the lse-gradient "
                           f"fallback adds {ALIGN} columns), got {hd}: use attention_backend=flex")
    cu_seqlens, max_seqlen = seq.varlen()
    q, k, v = (x.transpose(1, 2).reshape(B * T, -1, hd) for x in (q, k, v))  # (B*T, n, hd)
    out, lse, _, _ = varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, lse_grad)
    out = out.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    lse = lse.view(nh, B, T).permute(1, 0, 2)  # (B, nh, T)
    return out, lse
