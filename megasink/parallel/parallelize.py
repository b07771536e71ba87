"""Apply parallelism to a plain single-device model, in a fixed order (torchtitan style):
tensor parallelism here, then the pipeline split (parallel/pipeline.py). Data parallelism and
ZeRO come from DeepSpeed."""
from __future__ import annotations

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims


def parallelize(model: torch.nn.Module, cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    if dims.tp > 1:
        from megasink.parallel.tensor import apply_tensor_parallel

        model = apply_tensor_parallel(model, dims)
    return model  # pipeline stages are cut by megasink.parallel.pipeline.build_pipeline_module
