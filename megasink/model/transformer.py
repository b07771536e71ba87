"""Llama-style decoder with sink-aware attention. Single device; parallelised from outside.

    tokens (B, T) -> embedding -> [Block x n_layers] -> RMSNorm -> output -> logits (B, T, V)

Each Block returns its attention gates' per-head sums over the counted tokens; the model
returns them, (L, H_local), with the token count. Importance and the aux loss follow from them
in one place (importance.py): here for one device, in megasink/parallel/stats.py after the
global reduction for a parallel run. Nothing outside the constructor steers the model: what to
measure is an argument of ``forward``. Layers live in a ModuleDict keyed by their global index,
and ``run_blocks`` runs any such dict, so a pipeline stage that keeps a subset of them keeps
their names (and checkpoint keys) and runs them with this file's code.
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
    logits: Optional[torch.Tensor]  # (B, T, V) (the vocabulary shard under tensor parallelism); None if not asked
    loss: Optional[torch.Tensor]  # LM cross-entropy (mean over target tokens), if targets given
    aux_loss: torch.Tensor  # coef * sum_l CV^2 of this batch's importance (0 without the aux loss)
    importance: Optional[torch.Tensor]  # (L, H) this batch's per-head importance; None if not measured
    gate_sums: Optional[torch.Tensor]  # (L, H_local) differentiable sums of gates over counted tokens
    gate_count: torch.Tensor  # () number of counted tokens


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, seq: SeqInfo, backend: str, weights, gate_grad: bool, measure: bool):
        """x (B, T, d) -> (x, g): g the gate sums over token ``weights`` (nh,) in the accumulation
        dtype, None for an unmeasured vanilla gate (Attention.forward)."""
        a, g = self.attention(self.attention_norm(x), cos, sin, seq, backend, weights, gate_grad=gate_grad,
                              measure=measure)
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x))
        return x, g


def cross_entropy(logits2d: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean LM cross-entropy over targets != -100, accumulated in fp32 (or fp64)."""
    logits2d = logits2d.to(torch.promote_types(logits2d.dtype, torch.float32))
    return F.cross_entropy(logits2d, targets, ignore_index=-100)


def needs_lse_grad(variant: str, gate_grad: bool) -> bool:
    """Will backprop go through attention's lse? Sink attention always; vanilla when its gate
    is differentiated (the aux loss)."""
    return torch.is_grad_enabled() and (variant == "sink" or (variant == "vanilla" and gate_grad))


def check_sliding_window(seq: SeqInfo, cfg: ModelConfig) -> None:
    """Refuse documents longer than model.sliding_window: megasink attends to each whole document, which is
    the source model's sliding-window attention only up to the window. Rows no longer than the window
    pass without a host sync."""
    window = cfg.sliding_window
    if window and seq.shape[1] > window:
        longest = int(seq.positions.max()) + 1
        if longest > window:
            raise ValueError(f"a document of {longest} tokens exceeds model.sliding_window={window}: megasink "
                             "attends to whole documents, the source model's sliding-window attention only up to "
                             f"its window; pass documents of at most {window} tokens")


def run_blocks(blocks: nn.ModuleDict, h: torch.Tensor, seq: SeqInfo, rope: RotaryEmbedding, cfg: ModelConfig, *,
               gate_grad: bool, measure: bool, checkpointing: bool = False):
    """Run ``blocks`` (global index -> Block, in order) on h (B, T, d) -> (h, gate sums
    (L_run, H_local) or None when unmeasured, count ()). The one block runner: the whole model
    and each pipeline stage call it. ``gate_grad``: a loss differentiates the gates (the aux
    loss); ``measure``: someone reads them (see Attention.forward)."""
    check_sliding_window(seq, cfg)
    gate_grad = gate_grad and torch.is_grad_enabled()
    backend = resolve_backend(cfg.attention_backend, h.device, needs_lse_grad(cfg.attention, gate_grad))
    seq.prepare(backend, h.dtype)  # the route's masks / offsets, once, before any (compiled) block
    cos, sin = rope(seq.positions)
    weights = imp_lib.token_weights(seq, cfg.attention)  # (B, T)
    sums = []
    for block in blocks.values():
        args = (h, cos, sin, seq, backend, weights, gate_grad, measure)
        if checkpointing and torch.is_grad_enabled():
            h, s = checkpoint(block, *args, use_reentrant=False)
        else:
            h, s = block(*args)
        sums.append(s)
    measured = all(s is not None for s in sums)
    return h, torch.stack(sums) if measured else None, weights.sum()


class Transformer(nn.Module):
    """The single-device model. ``aux_cfg`` (coef, scale_by_heads) defines ``.aux_loss`` and
    whether vanilla gates carry a gradient; ``activation_checkpointing`` recomputes each block
    in the backward. Both are fixed here, at construction."""

    def __init__(self, cfg: ModelConfig, aux_cfg: Optional[AuxLossConfig] = None, *,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.aux_cfg = aux_cfg or AuxLossConfig()
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding.from_config(cfg)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # (L, H) True for shared heads (fine-tuning): excluded from the CV. Saved in checkpoints.
        self.register_buffer("shared_heads", torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool))
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

    @property
    def trains_gates(self) -> bool:
        """Does the aux loss differentiate the gates (aux_loss.coef > 0)?"""
        return self.aux_cfg.coef > 0

    def run_layers(self, h: torch.Tensor, seq: SeqInfo, measure: bool = True):
        """h (B, T, d) -> (h, gate_sums (L, H_local) or None, count ())."""
        return run_blocks(self.layers, h, seq, self.rope, self.cfg, gate_grad=self.trains_gates, measure=measure,
                          checkpointing=self.activation_checkpointing)

    def routed_mask(self) -> torch.Tensor:
        return ~self.shared_heads

    def forward(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, *, measure: bool = True,
                logits: bool = True) -> ModelOutput:
        """tokens (B, T) -> ModelOutput. ``measure=False``: vanilla gates are computed only where
        the aux loss differentiates them (no importance then); sink and gated gates always are.
        ``logits=False``: only the gate statistics are wanted (head diagnosis, the trainer's
        statistics pass): the output layer, B x T x V, is not computed (``.logits`` is None).
        With a vocabulary-sharded output (tensor parallelism) the LM loss is the caller's
        (megasink.parallel.tensor.cross_entropy_sum), and importance needs the heads gathered first."""
        seq = SeqInfo.build(tokens, doc_ids)
        h, sums, count = self.run_layers(self.tok_embeddings(tokens), seq, measure)  # (B, T, d)
        out = self.output(self.norm(h)) if logits or targets is not None else None  # (B, T, V)
        loss = None
        if targets is not None:
            if out.shape[-1] != self.cfg.vocab_size:
                raise ValueError(f"logits cover {out.shape[-1]} of {self.cfg.vocab_size} vocabulary entries "
                                 "(a tensor-parallel shard): compute the loss with "
                                 "megasink.parallel.tensor.cross_entropy_sum")
            loss = cross_entropy(out.flatten(0, 1), targets.flatten())
        imp = None
        if sums is not None and sums.shape[1] == self.cfg.n_heads:  # every head here (no TP shard)
            imp = imp_lib.importance(sums, count)
        if imp is not None and self.trains_gates:
            aux = imp_lib.aux_loss(imp, self.routed_mask(), self.aux_cfg.coef, self.aux_cfg.scale_by_heads)
        else:  # a constant: no zero gradients sent back into every gate
            aux = torch.zeros((), dtype=h.dtype if h.is_floating_point() else torch.float32, device=h.device)
        return ModelOutput(out, loss, aux, imp, sums, count)
