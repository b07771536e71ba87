"""Llama-style decoder with sink-aware attention. Single device; parallelised from outside.

    tokens (B, T) -> embedding -> [Block x n_layers] -> RMSNorm -> output -> logits (B, T, V)

Each Block returns its attention gates; the model turns them into per-head gate sums
(L, H) and a token count, from which importance and the aux loss follow (importance.py).
Layers live in a ModuleDict keyed by their global index, so a pipeline stage that keeps
a subset of them keeps their names (and checkpoint keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megasink.config import AuxLossConfig, ModelConfig
from megasink.model import importance as imp_lib
from megasink.model.attention import Attention
from megasink.model.kernels import SeqInfo, resolve_backend
from megasink.model.layers import RMSNorm, RotaryEmbedding, SwiGLU


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # (B, T, V)
    loss: Optional[torch.Tensor]  # LM cross-entropy (mean over target tokens), if targets given
    aux_loss: torch.Tensor  # coef * sum_l CV^2 of this batch's importance
    importance: torch.Tensor  # (L, H) this batch's per-head importance
    gate_sums: torch.Tensor  # (L, H_local) differentiable sums of gates over counted tokens
    gate_count: torch.Tensor  # () number of counted tokens


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, seq: SeqInfo, backend: str, weights=None):
        """x (B, T, d) -> (x, g): g the gate sums over token ``weights`` (nh,), or with none the
        gates (B, nh, T), in the accumulation dtype; None for unmeasured vanilla gates
        (Attention.forward)."""
        a, g = self.attention(self.attention_norm(x), cos, sin, seq, backend, weights)
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x))
        return x, g


def cross_entropy(logits2d: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean LM cross-entropy over targets != -100, accumulated in fp32 (or fp64)."""
    logits2d = logits2d.to(torch.promote_types(logits2d.dtype, torch.float32))
    return F.cross_entropy(logits2d, targets, ignore_index=-100)


def gather_heads(sums: torch.Tensor) -> torch.Tensor:
    """Local -> global head statistics: the identity on one device (TP replaces it)."""
    return sums


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, aux_cfg: Optional[AuxLossConfig] = None):
        super().__init__()
        aux_cfg = aux_cfg or AuxLossConfig()
        self.cfg = cfg
        self.aux_coef = aux_cfg.coef
        self.scale_by_heads = aux_cfg.scale_by_heads
        self.activation_checkpointing = False
        # False: vanilla gates are not computed (their sums come back NaN) unless the aux loss
        # needs them; the trainer measures only on the steps it logs
        self.measure_importance = True
        self.cross_entropy = cross_entropy  # vocabulary-parallel under TP
        self.gather_heads = gather_heads  # differentiable all-gather over TP
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # (L, H) True for shared heads (fine-tuning): excluded from the CV. Saved in checkpoints.
        self.register_buffer("shared_heads", torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool))
        for block in self.layers.values():
            block.attention.gate_needs_grad = self.aux_coef > 0
        self.init_weights()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 L)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def needs_lse_grad(self) -> bool:
        """Will backprop go through attention's lse? (sink always; vanilla with the aux loss)."""
        if not torch.is_grad_enabled():
            return False
        return self.cfg.attention == "sink" or (self.cfg.attention == "vanilla" and self.aux_coef > 0)

    def backend_for(self, device: torch.device) -> str:
        return resolve_backend(self.cfg.attention_backend, device, self.needs_lse_grad())

    # The forward in three pieces so that pipeline stages can run a part of it.
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)  # (B, T, d)

    def run_layers(self, h: torch.Tensor, seq: SeqInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, d) -> (h, gate_sums (L_local, H_local), count ())."""
        backend = self.backend_for(h.device)
        seq.prepare(backend, h.dtype)  # the route's masks / offsets, once, before any (compiled) block
        cos, sin = self.rope(seq.positions)
        weights = imp_lib.token_weights(seq, self.cfg.attention)  # (B, T)
        sums = []
        for layer in self.layers.values():
            layer.attention.gate_needs_grad = self.aux_coef > 0  # follows aux_coef if changed later
            layer.attention.measure_gate = self.measure_importance or self.aux_coef > 0  # the aux loss reads them
            if self.activation_checkpointing and torch.is_grad_enabled():
                h, s = checkpoint(layer, h, cos, sin, seq, backend, weights, use_reentrant=False)
            else:
                h, s = layer(h, cos, sin, seq, backend, weights)
            sums.append(s if s is not None else self._unmeasured(layer, h))
        return h, torch.stack(sums), weights.sum()

    def _unmeasured(self, layer, h: torch.Tensor) -> torch.Tensor:
        """(nh_local,) NaN: the gate sums of a layer whose gates were not computed."""
        attn = layer.attention
        return torch.full((attn.wo.weight.shape[1] // attn.head_dim,), float("nan"), device=h.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))  # (B, T, V)

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def routed_mask(self) -> torch.Tensor:
        return ~self.shared_heads

    def forward(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> ModelOutput:
        seq = SeqInfo.build(tokens, doc_ids)
        h, sums, count = self.run_layers(self.embed(tokens), seq)
        logits = self.head(h)
        loss = self.lm_loss(logits, targets) if targets is not None else None
        imp = imp_lib.importance(self.gather_heads(sums), count)
        if self.aux_coef > 0:
            aux = imp_lib.aux_loss(imp, self.routed_mask(), self.aux_coef, self.scale_by_heads)
        else:  # a constant: no zero gradients sent back into every gate
            aux = torch.zeros((), dtype=imp.dtype, device=imp.device)
        return ModelOutput(logits, loss, aux, imp, sums, count)
