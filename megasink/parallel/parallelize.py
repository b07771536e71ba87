"""Apply parallelism to a plain single-device model, in a fixed order (torchtitan style):
tensor parallelism, then pipeline split. Data parallelism and ZeRO come from DeepSpeed."""
from __future__ import annotations

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims


def parallelize(model: torch.nn.Module, cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    if dims.tp > 1:
        from megasink.parallel.tensor import apply_tensor_parallel

        model = apply_tensor_parallel(model, dims)
    if dims.pp > 1:
        raise NotImplementedError("pipeline parallelism (parallel.pp > 1) is not implemented yet")
    return model
