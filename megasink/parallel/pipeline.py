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
over TP and DP by ``stats.globalize``), so each layer hands d(L_aux)/d(gate sums) to its gate
sums through ``stats.AuxGrad`` on its activations, as the one-stage trainer does on its loss.
No scalar travels between stages; the gradient equals the single-device one (docs/design.md,
"The distributed aux-gradient invariant"). With ``aux_loss.accumulation: global`` (required
here) the global importance of the step is measured first by a no-grad pipelined pass
(``eval_batch``), which also screens for non-finite losses before any backward. Each block
runs through the model's own block runner (``transformer.run_blocks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from megasink.config import Config
from megasink.model.kernels import SeqInfo
from megasink.model.transformer import run_blocks
from megasink.parallel import stats
from megasink.parallel.dims import ParallelDims


@dataclass
class StageContext:
    """Shared by a stage's pipe layers: what to do with gate statistics this pass."""

    dims: ParallelDims
    layers: range  # this stage's layers (global indices)
    mode: str = "off"  # off | collect | inject
    sums: dict = field(default_factory=dict)  # layer -> (1, H_local) accumulated (collect)
    count: Optional[torch.Tensor] = None
    grad: Optional[torch.Tensor] = None  # (L_stage, H) dL_aux/dS, global heads (inject)
    scale: float = 1.0  # stats.loss_scales(...).injected_grad (inject)

    def reset(self) -> None:
        self.sums, self.count = {}, None

    def record(self, layer: int, sums: torch.Tensor, count: torch.Tensor) -> None:
        self.sums[layer] = self.sums[layer] + sums.detach() if layer in self.sums else sums.detach().clone()
        if layer == self.layers.start:
            self.count = count.detach().clone() if self.count is None else self.count + count.detach()

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's global (L_stage, H) gate sums and token count (collective over TP and DP)."""
        sums = torch.cat([self.sums[i] for i in self.layers])  # (L_stage, H_local)
        return stats.globalize(sums, self.count, self.dims)


class EmbedPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, inputs):
        tokens, doc_ids = inputs
        return self.tok_embeddings(tokens), doc_ids  # (B, T, d), (B, T)


class BlockPipe(nn.Module):
    def __init__(self, model, index: int, ctx: StageContext):
        super().__init__()
        self.index, self.ctx, self.cfg = index, ctx, model.cfg
        self.layers = nn.ModuleDict({str(index): model.layers[str(index)]})  # keeps the name layers.<i>.*
        self.rope = model.rope  # no parameters, no persistent buffers
        self.gate_grad, self.checkpointing = model.trains_gates, model.activation_checkpointing

    def forward(self, inputs):
        h, doc_ids = inputs
        seq = SeqInfo.build(doc_ids, doc_ids)
        measure = self.ctx.mode != "off"
        h, sums, count = run_blocks(self.layers, h, seq, self.rope, self.cfg, gate_grad=self.gate_grad,
                                    measure=measure, checkpointing=self.checkpointing)  # sums (1, H_local)
        if measure:
            self.ctx.record(self.index, sums, count)
        if self.ctx.mode == "inject" and torch.is_grad_enabled():
            k = self.index - self.ctx.layers.start
            h = stats.attach_aux_grad(h, sums, self.ctx.grad[k:k + 1], self.ctx.dims, self.ctx.scale)
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
    """(PipelineModule, StageContext) for this rank's stage; blocks balanced over stages. The
    loss function takes labels ``(targets, weight)``: the micro-batch's cross-entropy sum times
    its weight (stats.loss_scales(...).loss_term / the step's global target count)."""
    from megasink.parallel.engine import import_deepspeed
    from megasink.parallel.tensor import cross_entropy_sum

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the torch group
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ctx = StageContext(dims, stage_layers(cfg.model.n_layers, dims))
    blocks = [BlockPipe(model, i, ctx) for i in range(cfg.model.n_layers)]
    if cfg.model.tie_embeddings:
        tied = dict(tied_weight_attr=["embedding.weight"])
        layers = [TiedLayerSpec("vocab", TiedVocab, model.tok_embeddings, forward_fn=_tied_embed, **tied), *blocks,
                  HeadPipe(model, with_output=False),
                  TiedLayerSpec("vocab", TiedVocab, model.tok_embeddings, forward_fn=_tied_head, **tied)]
    else:
        layers = [EmbedPipe(model), *blocks, HeadPipe(model)]

    def loss_fn(logits, labels):
        targets, weight = labels
        return cross_entropy_sum(logits, targets, dims) * weight

    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    pipe = PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method="type:BlockPipe")
    return pipe, ctx
