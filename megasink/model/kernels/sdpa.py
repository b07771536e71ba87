"""Inference route: PyTorch's fused attention with its stock autograd, which drops the lse
gradient (lse comes back detached). ``resolve_backend`` refuses it wherever a loss would
differentiate lse."""
from __future__ import annotations

import torch

from megasink.model.kernels.seq import SeqInfo


def sdpa_attention(q, k, v, scale: float, seq: SeqInfo, lse_grad: bool = False):
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) -> out (B, nh, T, hd), lse (B, nh, T) detached."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    mask = seq.additive_mask(q.dtype)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
    else:
        bias = None if mask is None else efficient_attention_bias(mask, q.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, mask is None, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # the CUDA kernel pads lse's length to a multiple of 32
    return out, lse.detach()


def efficient_attention_bias(mask: torch.Tensor, n_heads: int, alignment: int = 8) -> torch.Tensor:
    """(B, 1, T, S) additive mask -> the (B, n_heads, T, S) bias CUDA's memory-efficient kernel
    accepts: its storage's last dim padded to a multiple of ``alignment`` (the kernel checks the
    bias's row stride), then expanded over the heads (it checks the head dim), as public
    ``scaled_dot_product_attention`` prepares a mask (aten's preprocess_mask). A view: no copy
    per head."""
    B, _, T, S = mask.shape
    pad = (-S) % alignment
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))[..., :S]  # (B, 1, T, S), row stride S + pad
    return mask.expand(B, n_heads, T, S)
