"""Apply parallelism to a plain single-device model, in a fixed order (torchtitan style):
tensor parallelism, then torch.compile of each block (train.compile), then the pipeline split
(parallel/pipeline.py). Activation checkpointing wraps each (compiled) block in
``Transformer.run_layers``. Data parallelism and ZeRO come from DeepSpeed."""
from __future__ import annotations

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims


def parallelize(model: torch.nn.Module, cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    if dims.tp > 1:
        from megasink.parallel.tensor import apply_tensor_parallel

        model = apply_tensor_parallel(model, dims)
    if cfg.train.compile:  # config validation allows it with tp = pp = 1 only
        apply_compile(model, cfg.train.compile_backend)
    return model  # pipeline stages are cut by megasink.parallel.pipeline.build_pipeline_module


def apply_compile(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place (``Module.compile``: parameter names and
    checkpoint keys unchanged). Blocks share their code, so all layers reuse one graph; the
    attention kernels are custom ops with fake functions, so a block is one graph
    (fullgraph) and a new batch layout (documents per batch) does not recompile it."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True)
