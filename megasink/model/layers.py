"""Building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in fp32 (fp64 stays fp64), back in x's dtype, times the weight (as Llama)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xhat.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama / Hugging Face layout (rotate the two halves of each head)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, head_dim / 2] (fp32), one per frequency."""
        freqs = positions.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, hd); cos/sin (B, T, hd / 2) from RotaryEmbedding -> rotated x, x's dtype.

    The Llama / HF rotation x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over
    the two halves of each head, computed in fp32 (or fp64)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos[:, :, None, :].to(acc), sin[:, :, None, :].to(acc)  # (B, T, 1, hd/2)
    x1, x2 = x.to(acc).chunk(2, dim=-1)  # (B, T, nh, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): w1/w3 column-parallel, w2 row-parallel under TP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
