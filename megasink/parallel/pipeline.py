"""Pipeline parallelism on DeepSpeed's PipelineModule (1F1B schedule, ZeRO-0/1).

The (possibly tensor-parallel) Transformer is cut into pipe layers::

    EmbedPipe -> BlockPipe(0) ... BlockPipe(L-1) -> HeadPipe      (+ loss_fn on the last stage)

balanced by block count over ``pp`` stages (embedding on the first, norm + head + loss on
the last; with ``model.tie_embeddings`` the two share one matrix through DeepSpeed's
TiedLayerSpec). Activations travel between stages as ``(h, doc_ids)``; each stage rebuilds the
document layout from ``doc_ids`` for its own masks, positions and gates. Parameter names
inside each wrapper equal the Transformer's, so "<pipe index>.<name>" maps back to a
Transformer state_dict key by dropping the first component (``canonical_name``).

The aux loss across stages: a stage's layers know their own global importance (made global
over TP and DP by ``stats.globalize``), so each layer attaches d(L_aux)/d(gate sums) to its
activations with ``AuxInject``, an identity whose backward adds that gradient to the gate
sums. No scalar travels between stages; the gradient equals the single-device one
(docs/design.md, "The distributed aux-gradient invariant").
With ``aux_loss.accumulation: global`` (required here) the global importance of the step is
measured first by a no-grad pipelined pass (``eval_batch``), which also screens for
non-finite losses before any backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megasink.config import Config
from megasink.model import importance as imp_lib
from megasink.model.kernels import SeqInfo, resolve_backend
from megasink.model.layers import RotaryEmbedding
from megasink.parallel.dims import ParallelDims


class AuxInject(torch.autograd.Function):
    """Identity on h; in the backward, gate sums receive `grad` (the aux-loss gradient)."""

    @staticmethod
    def forward(ctx, h, sums, grad):
        ctx.save_for_backward(grad)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g, grad, None


@dataclass
class StageContext:
    """Shared by a stage's pipe layers: what to do with gate statistics this pass."""

    mode: str = "off"  # off | collect | inject
    sums: dict = field(default_factory=dict)  # layer -> (H_local,) accumulated (collect)
    count: Optional[torch.Tensor] = None
    grad: dict = field(default_factory=dict)  # layer -> (H_local,) dL/dS * scale (inject)

    def reset(self) -> None:
        self.sums, self.count = {}, None

    def record(self, layer: int, sums: torch.Tensor, count: torch.Tensor, first_layer: bool) -> None:
        self.sums[layer] = self.sums[layer] + sums.detach() if layer in self.sums else sums.detach().clone()
        if first_layer:
            self.count = count.detach().clone() if self.count is None else self.count + count.detach()


class EmbedPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, inputs):
        tokens, doc_ids = inputs
        return self.tok_embeddings(tokens), doc_ids  # (B, T, d), (B, T)


class BlockPipe(nn.Module):
    def __init__(self, model, index: int, ctx: StageContext, first_of_stage: bool):
        super().__init__()
        self.index, self.ctx, self.first = index, ctx, first_of_stage
        self.layers = nn.ModuleDict({str(index): model.layers[str(index)]})  # keeps the name layers.<i>.*
        self.rope = RotaryEmbedding(model.cfg.head_dim, model.cfg.rope_theta)
        self.variant, self.backend_name = model.cfg.attention, model.cfg.attention_backend
        self.lse_grad = model.cfg.attention == "sink" or (model.cfg.attention == "vanilla" and model.aux_coef > 0)
        self.checkpointing = model.activation_checkpointing

    def forward(self, inputs):
        h, doc_ids = inputs
        seq = SeqInfo.build(doc_ids, doc_ids)
        cos, sin = self.rope(seq.positions)
        backend = resolve_backend(self.backend_name, h.device, torch.is_grad_enabled() and self.lse_grad)
        seq.prepare(backend, h.dtype)
        block = self.layers[str(self.index)]
        weights = imp_lib.token_weights(seq, self.variant)
        if self.checkpointing and torch.is_grad_enabled():
            h, sums = checkpoint(block, h, cos, sin, seq, backend, weights, use_reentrant=False)
        else:
            h, sums = block(h, cos, sin, seq, backend, weights)  # sums (H_local,)
        if self.ctx.mode in ("collect", "inject"):
            self.ctx.record(self.index, sums, weights.sum(), self.first)
        if self.ctx.mode == "inject" and torch.is_grad_enabled():
            h = AuxInject.apply(h, sums, self.ctx.grad[self.index].to(sums.dtype))
        return h, doc_ids


class HeadPipe(nn.Module):
    def __init__(self, model, with_output: bool = True):
        super().__init__()
        self.norm = model.norm
        self.output = model.output if with_output else None

    def forward(self, inputs):
        h, _ = inputs
        h = self.norm(h)
        return self.output(h) if self.output is not None else h  # (B, T, V_local) or (B, T, d)


class TiedVocab(nn.Module):
    """Tied input embedding / output projection, owned by the first and the last stage;
    DeepSpeed keeps the two copies equal (weights broadcast, gradients all-reduced)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding  # nn.Embedding, or its vocabulary shard under TP


def _tied_embed(module: TiedVocab, inputs):
    tokens, doc_ids = inputs
    return module.embedding(tokens), doc_ids


def _tied_head(module: TiedVocab, h):
    from megasink.parallel.tensor import CopyToTP

    group = getattr(module.embedding, "group", None)
    if group is not None:
        h = CopyToTP.apply(h, group)
    return torch.nn.functional.linear(h, module.embedding.weight)  # (B, T, V_local)


TIED_PREFIX = "tied_modules.vocab.embedding."


def canonical_name(pipe_name: str) -> str:
    """'<pipe layer index>.<Transformer name>' (or the tied vocabulary) -> Transformer name."""
    if pipe_name.startswith(TIED_PREFIX):
        return "tok_embeddings." + pipe_name[len(TIED_PREFIX):]
    return pipe_name.split(".", 1)[1]


def stage_layers(n_layers: int, dims: ParallelDims) -> range:
    per = n_layers // dims.pp
    return range(dims.pp_rank * per, (dims.pp_rank + 1) * per)


def build_pipeline_module(model, cfg: Config, dims: ParallelDims):
    """(PipelineModule, StageContext) for this rank's stage; blocks balanced over stages."""
    from megasink.parallel.engine import import_deepspeed

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the torch group
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from deepspeed.pipe import TiedLayerSpec

    ctx = StageContext()
    mine = stage_layers(cfg.model.n_layers, dims)
    blocks = [BlockPipe(model, i, ctx, first_of_stage=(i == mine.start)) for i in range(cfg.model.n_layers)]
    if cfg.model.tie_embeddings:
        tied = dict(tied_weight_attr=["embedding.weight"])
        layers = [TiedLayerSpec("vocab", TiedVocab, model.tok_embeddings, forward_fn=_tied_embed, **tied), *blocks,
                  HeadPipe(model, with_output=False),
                  TiedLayerSpec("vocab", TiedVocab, model.tok_embeddings, forward_fn=_tied_head, **tied)]
    else:
        layers = [EmbedPipe(model), *blocks, HeadPipe(model)]
    cross_entropy = model.cross_entropy

    def loss_fn(logits, targets):
        return cross_entropy(logits.flatten(0, 1), targets.flatten())

    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    pipe = PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method="type:BlockPipe")
    return pipe, ctx
