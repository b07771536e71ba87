"""The one owner of parallel head statistics: local gate sums -> global ones before the CV.

Each rank holds gate sums for its own heads (TP shard) over its own tokens (DP shard,
micro-batch). ``globalize`` sums over data-parallel ranks and gathers heads over
tensor-parallel ranks, giving every rank the layer's full (L, H) vector and the global
token count. The gradient of the aux loss then reaches each rank's own gates through
``surrogate``: (dL/dS)[local heads] . S_local — each token's and head's contribution is
counted exactly once, on the rank that owns it. The rule and the scale factors the trainers
pass are stated once in docs/design.md, "The distributed aux-gradient invariant".
"""
from __future__ import annotations

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


def local_heads(full: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """(L, H) -> (L, H_local): this TP rank's heads."""
    h = full.shape[1] // dims.tp
    return full[:, dims.tp_rank * h:(dims.tp_rank + 1) * h]


def surrogate(local_sums: torch.Tensor, grad_full: torch.Tensor, dims: ParallelDims, scale: float) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the local gate sums is scale * dL_aux/dS (local heads);
    ``scale`` undoes the engine's averaging (docs/design.md, "The distributed aux-gradient
    invariant")."""
    return scale * (local_heads(grad_full, dims).to(local_sums.dtype) * local_sums).sum()


def gather_layers_over_pp(values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """(L_stage, ...) on each stage -> (L, ...) on every rank, for logging."""
    if dims.pp == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dims.pp)]
    dist.all_gather(parts, values.contiguous(), group=dims.group("pp"))
    return torch.cat(parts, dim=0)
