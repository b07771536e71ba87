"""Gather and slice tensor-parallel shards along a parameter's ``tp_shard_dim``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megasink.parallel.dims import ParallelDims


def gather_tp_tensor(t: torch.Tensor, dim: Optional[int], dims: ParallelDims) -> torch.Tensor:
    """Local shard -> full tensor along `dim` over the TP group (None: replicated, as is)."""
    if dim is None or dims.tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.contiguous(), group=dims.group("tp"))  # tp x local shard
    return torch.cat(parts, dim=dim)


def slice_tp_tensor(full: torch.Tensor, dim: Optional[int], dims: ParallelDims) -> torch.Tensor:
    if dim is None or dims.tp == 1:
        return full
    return full.chunk(dims.tp, dim=dim)[dims.tp_rank].contiguous()
