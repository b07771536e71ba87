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
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, mask is None, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # the CUDA kernel pads lse's length to a multiple of 32
    return out, lse.detach()
