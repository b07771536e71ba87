"""The one owner of parallel statistics and of the gradient scales that make a step exact.

Each rank holds gate sums for its own heads (TP shard) over its own tokens (DP shard,
micro-batch). ``globalize`` sums them over data-parallel ranks and gathers heads over
tensor-parallel ranks, giving every rank the layer's full (L, H) vector and the global token
count; the aux loss and its gradient dL_aux/dS then follow in one place
(``importance.aux_loss_and_grad``). ``AuxGrad`` hands each rank's own gate sums their share of
that gradient, and ``loss_scales`` is the one statement of the factors that undo the engine's
averaging (docs/design.md, "The distributed aux-gradient invariant").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megasink.parallel.dims import ParallelDims


def globalize(sums: torch.Tensor, count: torch.Tensor, dims: ParallelDims) -> tuple[torch.Tensor, torch.Tensor]:
    """sums (L, H_local), count () local -> (L, H) and () global; detached."""
    sums = sums.detach().clone()
    count = count.detach().clone().reshape(1)
    if dims.dp > 1:
        dist.all_reduce(sums, group=dims.group("dp"))  # sum over token shards
        dist.all_reduce(count, group=dims.group("dp"))
    if dims.tp > 1:
        parts = [torch.empty_like(sums) for _ in range(dims.tp)]
        dist.all_gather(parts, sums.contiguous(), group=dims.group("tp"))  # tp x (L, H_local)
        sums = torch.cat(parts, dim=1)  # (L, H), heads in TP-rank order
    return sums, count[0]


def dp_sum(value, dims: ParallelDims) -> torch.Tensor:
    """() fp64 sum of a per-rank scalar over the data-parallel group (on the rank's device, no host sync)."""
    v = torch.as_tensor(value, device=dims.device).detach().to(torch.float64).reshape(1).clone()
    if dims.dp > 1:
        dist.all_reduce(v, group=dims.group("dp"))
    return v[0]


def global_target_count(batches: list, dims: ParallelDims) -> torch.Tensor:
    """() the number of target tokens (targets != -100: with loss masks, the response tokens) in
    the step's global batch, all micro-batches of every data-parallel rank; at least 1 (a batch
    of prompts only has a zero loss, not a 0/0)."""
    return dp_sum(sum((b["targets"] != -100).sum() for b in batches), dims).clamp_min(1.0)


@dataclass(frozen=True)
class LossScales:
    loss_term: float
    """Multiplies a micro-batch's share of the step's loss before engine.backward."""
    injected_grad: float
    """Multiplies a gradient handed to the gate sums by ``AuxGrad`` (no loss scaling touches it)."""


def loss_scales(dims: ParallelDims, accum: int) -> LossScales:
    """The factors that undo the engine's averaging, stated once (docs/design.md, "The
    distributed aux-gradient invariant"): DeepSpeed divides every loss by the gradient
    accumulation steps A before its backward (the pipeline engine too, on its last stage) and
    averages gradients over the dp data-parallel ranks. A micro-batch's share of the global
    loss is therefore multiplied by A * dp; a gradient injected by ``AuxGrad``, which no loss
    scaling reaches, by dp."""
    return LossScales(loss_term=float(accum * dims.dp), injected_grad=float(dims.dp))


def local_heads(full: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """(L, H) -> (L, H_local): this TP rank's heads."""
    h = full.shape[1] // dims.tp
    return full[:, dims.tp_rank * h:(dims.tp_rank + 1) * h]


class AuxGrad(torch.autograd.Function):
    """Identity on ``x``; in the backward the gate sums receive ``grad`` (the aux loss's
    gradient at this rank's heads, scaled): Megatron's MoE aux-loss auto-scaler. ``x`` is any
    tensor the backward passes through: the micro-batch's loss, or a pipeline stage's
    activations, so no scalar has to travel between stages."""

    @staticmethod
    def forward(ctx, x, sums, grad):
        ctx.save_for_backward(grad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g, grad, None


def attach_aux_grad(x: torch.Tensor, local_sums: torch.Tensor, grad_full: torch.Tensor, dims: ParallelDims,
                    scale: float) -> torch.Tensor:
    """x, unchanged, whose backward hands ``scale * dL_aux/dS`` (this rank's heads of the
    global (L, H) gradient ``grad_full``) to ``local_sums`` (L, H_local)."""
    grad = (scale * local_heads(grad_full, dims)).to(local_sums.dtype)
    return AuxGrad.apply(x, local_sums, grad)


def gather_layers_over_pp(values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """(L_stage, ...) on each stage -> (L, ...) on every rank, for logging."""
    if dims.pp == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dims.pp)]
    dist.all_gather(parts, values.contiguous(), group=dims.group("pp"))
    return torch.cat(parts, dim=0)
