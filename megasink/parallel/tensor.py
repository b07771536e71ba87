"""Megatron-style tensor parallelism, applied to a plain model from outside.

Column-parallel linears (q/k/v with the gated variant's gate columns, MLP w1/w3, the output
head over the vocabulary) split their output features by rank; row-parallel linears (wo,
w2) split their input features and all-reduce the output. Each layer therefore does
Megatron's two forward all-reduces (after wo, after w2) and its two backward ones (the
gradients of the two norm outputs that feed column-parallel linears, ``CopiedNorm``), the
embedding one more, and the vocabulary-parallel cross-entropy three small ones per token. Sink logits and gate biases
live on the rank that owns their heads, as do the q/k/v biases (a column-parallel linear's bias is
split with its rows). The per-head q/k norms (QK-norm) are replicated: each rank's weight
gradient covers only its own heads, so it is all-reduced over TP (``HeadNorm``).

Every sharded parameter carries ``tp_shard_dim`` (and DeepSpeed's ``tensor_model_parallel``)
so checkpoints can be regathered and resliced (megasink/train/state.py).

Per-head statistics stay per rank (each rank's gate sums cover its own heads); the one gather
over the TP group is ``stats.globalize``, and the aux gradient comes back to each head's owner
through ``stats.AuxGrad``. The LM loss of vocabulary-sharded logits is ``cross_entropy_sum``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megasink.model.layers import RMSNorm, rms_norm
from megasink.parallel.dims import ParallelDims


# --------------------------------------------------------------------------- collectives
class CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over TP (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's "g")."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


# --------------------------------------------------------------------------- layers
def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tp_shard_dim = dim
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, W and its bias split by output features (rows of W, so a
    head's bias stays with its head).

    ``copy_input=False``: the input already passed through CopyToTP once for all its
    consumers (a TP block's norm output), so its gradient is all-reduced there, once."""

    def __init__(self, full: nn.Linear, dims: ParallelDims, copy_input: bool = True):
        super().__init__()
        self.group = dims.group("tp")
        self.copy_input = copy_input
        w = full.weight.detach().chunk(dims.tp, dim=0)[dims.tp_rank]  # (out/tp, in)
        self.weight = _mark(nn.Parameter(w.clone()), 0)
        self.bias = None
        if full.bias is not None:
            b = full.bias.detach().chunk(dims.tp, dim=0)[dims.tp_rank]  # (out/tp,)
            self.bias = _mark(nn.Parameter(b.clone()), 0)

    def forward(self, x):
        return F.linear(CopyToTP.apply(x, self.group) if self.copy_input else x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T), W split by input features (columns of W)."""

    def __init__(self, full: nn.Linear, dims: ParallelDims):
        super().__init__()
        self.group = dims.group("tp")
        w = full.weight.detach().chunk(dims.tp, dim=1)[dims.tp_rank]  # (out, in/tp)
        self.weight = _mark(nn.Parameter(w.clone()), 1)

    def forward(self, x):
        return ReduceFromTP.apply(F.linear(x, self.weight), self.group)


class ReplicatedHeadsLinear(nn.Module):
    """kv projection when there are fewer kv heads than TP ranks: the full weight on every
    rank, each rank computing only the kv heads its query heads use. Every rank's weight (and
    bias) gradient is partial, so it is all-reduced over TP (CopyToTP on the weight)."""

    def __init__(self, full: nn.Linear, dims: ParallelDims, n_kv: int, n_q: int, head_dim: int,
                 copy_input: bool = True):
        super().__init__()
        self.group = dims.group("tp")
        self.copy_input = copy_input
        self.weight = nn.Parameter(full.weight.detach().clone())  # (n_kv * hd, in), replicated
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())  # (n_kv * hd,)
        q_local = n_q // dims.tp
        first_q = dims.tp_rank * q_local
        kv = first_q // (n_q // n_kv)  # the one kv head this rank's query heads share
        self.rows = slice(kv * head_dim, (kv + 1) * head_dim)

    def forward(self, x):
        w = CopyToTP.apply(self.weight, self.group)[self.rows]
        b = None if self.bias is None else CopyToTP.apply(self.bias, self.group)[self.rows]
        return F.linear(CopyToTP.apply(x, self.group) if self.copy_input else x, w, b)


class CopiedNorm(RMSNorm):
    """A block's RMSNorm whose output enters TP once (CopyToTP): the input gradients of the
    column-parallel linears that read it (wq, wk, wv, or w1, w3) sum locally, then one
    all-reduce, where one per linear would be exact too (by linearity) but 2.5x the traffic:
    Megatron's two backward all-reduces per layer. Same parameter (and name) as the norm."""

    def __init__(self, norm: RMSNorm, dims: ParallelDims):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group = dims.group("tp")

    def forward(self, x):
        return CopyToTP.apply(super().forward(x), self.group)


class HeadNorm(RMSNorm):
    """A replicated per-head norm (QK-norm) under TP: each rank normalises its own heads with the
    same weight, so each weight gradient is a partial sum over heads, all-reduced over TP
    (CopyToTP on the weight, as ReplicatedHeadsLinear). Same parameter (and name) as the norm."""

    def __init__(self, norm: RMSNorm, dims: ParallelDims):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group = dims.group("tp")

    def forward(self, x):
        return rms_norm(x, CopyToTP.apply(self.weight, self.group), self.eps)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, full: nn.Embedding, dims: ParallelDims):
        super().__init__()
        self.group = dims.group("tp")
        V = full.weight.shape[0]
        self.v_local = V // dims.tp
        self.start = dims.tp_rank * self.v_local
        w = full.weight.detach()[self.start:self.start + self.v_local]  # (V/tp, d)
        self.weight = _mark(nn.Parameter(w.clone()), 0)

    def forward(self, ids):
        outside = (ids < self.start) | (ids >= self.start + self.v_local)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return ReduceFromTP.apply(out, self.group)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over vocabulary-sharded logits; no rank holds the full vocabulary.

    logits (N, V/tp), targets (N,) -> per-token loss (N,) (0 where target == -100)."""

    @staticmethod
    def forward(ctx, logits, targets, group, start):
        logits = logits.float()
        vmax = logits.max(dim=-1).values
        dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - vmax[:, None]
        v_local = logits.shape[1]
        outside = (targets < start) | (targets >= start + v_local)
        local = (targets - start).masked_fill(outside, 0)
        picked = shifted.gather(1, local[:, None])[:, 0].masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        ignore = targets == -100
        loss = (sum_exp.log() - picked).masked_fill(ignore, 0.0)
        ctx.save_for_backward(exp / sum_exp[:, None], local, outside, ignore)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside, ignore = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= (~outside).to(grad.dtype)
        grad = grad * g.masked_fill(ignore, 0.0)[:, None]
        return grad, None, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """logits (B, T, V_local), targets (B, T) -> () sum of the LM cross-entropy over targets !=
    -100, in fp32 (fp64 stays fp64): vocabulary-parallel under TP (no rank holds every logit)."""
    logits2d, targets = logits.flatten(0, 1), targets.flatten()
    if dims.tp == 1:
        acc = torch.promote_types(logits2d.dtype, torch.float32)
        return F.cross_entropy(logits2d.to(acc), targets, ignore_index=-100, reduction="sum")
    start = dims.tp_rank * logits2d.shape[1]
    return VocabParallelCrossEntropy.apply(logits2d, targets, dims.group("tp"), start).sum()


# --------------------------------------------------------------------------- apply
def _shard_head_param(p: nn.Parameter, dims: ParallelDims) -> nn.Parameter:
    return _mark(nn.Parameter(p.detach().chunk(dims.tp, dim=0)[dims.tp_rank].clone()), 0)


def _parallelize_attention(attn, cfg, dims: ParallelDims) -> None:
    """Its input comes from a CopiedNorm: no CopyToTP of its own on q, k, v."""
    attn.wq = ColumnParallelLinear(attn.wq, dims, copy_input=False)  # heads (with their gate columns) split
    if cfg.kv_heads % dims.tp == 0:
        attn.wk, attn.wv = (ColumnParallelLinear(w, dims, copy_input=False) for w in (attn.wk, attn.wv))
    else:
        args = (dims, cfg.kv_heads, cfg.n_heads, cfg.head_dim)
        attn.wk, attn.wv = (ReplicatedHeadsLinear(w, *args, copy_input=False) for w in (attn.wk, attn.wv))
    attn.wo = RowParallelLinear(attn.wo, dims)
    if attn.q_norm is not None:
        attn.q_norm, attn.k_norm = HeadNorm(attn.q_norm, dims), HeadNorm(attn.k_norm, dims)
    for name in ("sinks", "gate_bias"):
        if getattr(attn, name, None) is not None:
            setattr(attn, name, _shard_head_param(getattr(attn, name), dims))


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Replace the model's layers by TP shards of the same weights (in place)."""
    cfg = model.cfg
    if cfg.vocab_size % dims.tp:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={dims.tp}")
    for block in model.layers.values():
        block.attention_norm = CopiedNorm(block.attention_norm, dims)
        block.ffn_norm = CopiedNorm(block.ffn_norm, dims)
        _parallelize_attention(block.attention, cfg, dims)
        ff = block.feed_forward
        ff.w1, ff.w3 = (ColumnParallelLinear(w, dims, copy_input=False) for w in (ff.w1, ff.w3))
        ff.w2 = RowParallelLinear(ff.w2, dims)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, dims)
    if cfg.tie_embeddings:
        model.output = ColumnParallelLinear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device="meta"), dims)
        model.output.weight = model.tok_embeddings.weight  # the same vocabulary shard
    else:
        model.output = ColumnParallelLinear(model.output, dims)
    return model
