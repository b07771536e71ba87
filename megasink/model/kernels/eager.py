"""Eager attention: explicit softmax in fp32 (fp64 stays fp64), autograd does the rest.
The numerical reference for every other route; O(T^2) memory, for tests and tiny runs."""
from __future__ import annotations

import torch

from megasink.model.kernels.seq import SeqInfo, acc_dtype


def eager_attention(q, k, v, scale: float, seq: SeqInfo, lse_grad: bool = True):
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) -> out (B, nh, T, hd), lse (B, nh, T)."""
    n_rep = q.shape[1] // k.shape[1]
    acc = acc_dtype(q.dtype)
    k, v = k.repeat_interleave(n_rep, dim=1).to(acc), v.repeat_interleave(n_rep, dim=1).to(acc)
    scores = torch.matmul(q.to(acc), k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    scores = scores.masked_fill(~seq.bool_mask()[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, nh, T)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, v).to(q.dtype)  # (B, nh, T, hd)
    return out, lse
