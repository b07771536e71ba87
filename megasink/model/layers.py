"""Building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megasink.config import ROPE_SCALINGS, ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim in fp32 (fp64 stays fp64), back in x's dtype, times the weight (as
    Llama and Qwen)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xhat.to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def scale_rope_frequencies(inv_freq: torch.Tensor, scaling: str, factor: float = 1.0, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0, original_seq_len: int = 8192) -> torch.Tensor:
    """RoPE frequency scaling (model.rope_scaling), the one dispatch:

    - none:   unchanged.
    - linear: every frequency / factor (positions interpolated by the factor).
    - llama3: Llama 3.1's: wavelengths 2 pi / f above original_seq_len / low_freq_factor are divided
              by factor, those below original_seq_len / high_freq_factor kept, and in between
              interpolated with s = (original_seq_len / wavelength - low) / (high - low):
              f' = (1 - s) f / factor + s f.
    """
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low = torch.where(wavelen > original_seq_len / low_freq_factor, inv_freq / factor, inv_freq)
        s = (original_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - s) * low / factor + s * low
        medium = (wavelen >= original_seq_len / high_freq_factor) & (wavelen <= original_seq_len / low_freq_factor)
        return torch.where(medium, smoothed, low)
    raise ValueError(f"model.rope_scaling={scaling!r}; allowed: {', '.join(ROPE_SCALINGS)}")


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama / Hugging Face layout (rotate the two halves of each head), with the
    frequencies scaled by ``scale_rope_frequencies`` (keyword arguments: its parameters)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: str = "none", **scaling_params):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        inv_freq = scale_rope_frequencies(inv_freq, scaling, **scaling_params)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RotaryEmbedding":
        """The rotary embedding of a ModelConfig (head_dim, rope_theta and the rope_* scaling fields)."""
        return cls(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, factor=cfg.rope_factor,
                   low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_seq_len=cfg.rope_original_seq_len)

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
