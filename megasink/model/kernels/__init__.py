"""Attention routes that return ``(out, lse)`` with a differentiable log-sum-exp.

Every route takes q (B, nh, T, hd), k/v (B, nkv, T, hd) (GQA: nkv divides nh), causal, with
the batch's documents from ``SeqInfo``, and returns out (B, nh, T, hd) in q's dtype and lse
(B, nh, T) in fp32 (fp64 for fp64 inputs), natural log.

Why the lse gradient matters (docs/design.md, "Attention routes"): the sink gate
sigmoid(lse - s) and the vanilla gate 1 - exp(s0 - lse) depend on lse, so the loss reaches
q and k through it, and the attention backward must use dS = P (dP - D + dLSE). Routes, one
file each:

- ``eager``   explicit softmax, autograd does it all: the reference; O(T^2) memory.
- ``flash``   the CPU fused flash kernel with a document mask (``cpu_flash.py``).
- ``varlen``  CUDA: PyTorch's FlashAttention-2 varlen kernels over packed documents (``varlen.py``).
- ``flex``    FlexAttention, Triton kernels (``flex.py``); training on CUDA only.
- ``sdpa``    stock fused op and autograd, drops dLSE: inference only (``sdpa.py``).
- ``auto``    ``flash`` on the CPU, ``varlen`` on CUDA.

``flash`` and ``varlen`` carry dLSE through their kernel's own backward by one shared rule
(``lse_grad.py``). The backend names live in ``megasink.config.ATTENTION_BACKENDS``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megasink.config import ATTENTION_BACKENDS
from megasink.model.kernels.cpu_flash import cpu_flash_attention
from megasink.model.kernels.eager import eager_attention
from megasink.model.kernels.flex import flex_attention_lse
from megasink.model.kernels.sdpa import sdpa_attention
from megasink.model.kernels.seq import BackendError, SeqInfo, acc_dtype
from megasink.model.kernels.varlen import varlen_attention

__all__ = ["SeqInfo", "BackendError", "acc_dtype", "resolve_backend", "attention_with_lse", "ATTENTION_BACKENDS"]


_ROUTES = {"eager": eager_attention, "flash": cpu_flash_attention, "varlen": varlen_attention,
           "flex": flex_attention_lse, "sdpa": sdpa_attention}
assert set(_ROUTES) | {"auto"} == set(ATTENTION_BACKENDS), "config.ATTENTION_BACKENDS and the routes disagree"


def resolve_backend(name: str, device: torch.device, needs_lse_grad: bool) -> str:
    """The concrete route for backend ``name`` on ``device``; refuses combinations that would
    be wrong. ``needs_lse_grad``: a gradient will be taken and the loss depends on lse."""
    if name not in ATTENTION_BACKENDS:
        raise BackendError(f"unknown attention backend {name!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        return "varlen" if cuda else "flash"
    if name == "flash" and cuda:
        raise BackendError("attention_backend=flash is the CPU flash kernel; on CUDA use varlen (or auto), "
                           "or flex")
    if name == "varlen" and not cuda:
        raise BackendError("attention_backend=varlen runs PyTorch's CUDA FlashAttention-2 kernels; "
                           "on the CPU use flash (or auto)")
    if name == "sdpa" and needs_lse_grad:
        raise BackendError(
            "attention_backend=sdpa drops the gradient of the log-sum-exp, which this loss needs "
            "(sink attention always; vanilla attention with aux_loss.coef > 0). "
            "Use attention_backend=auto to train, sdpa only for inference.")
    if name == "flex" and needs_lse_grad and not cuda:
        raise BackendError("attention_backend=flex cannot train on CPU: torch has no FlexAttention backward "
                           "on CPU. Use attention_backend=auto.")
    return name


def attention_with_lse(q, k, v, *, backend: str, seq: SeqInfo, scale: Optional[float] = None,
                       lse_grad: bool = True):
    """Causal, document-masked attention -> (out (B, nh, T, hd), lse (B, nh, T)) by the concrete
    route ``backend``. ``lse_grad`` False: nothing differentiates lse (routes may skip its gradient)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _ROUTES[backend](q, k, v, scale, seq, lse_grad)
