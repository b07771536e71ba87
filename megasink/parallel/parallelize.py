"""Apply parallelism to a plain single-device model, in one place and a fixed order
(torchtitan style): tensor parallelism, torch.compile of each block (train.compile), the
pipeline split, then the DeepSpeed engine (data parallelism, ZeRO, the optimizer and its
schedule). Activation checkpointing is the model's own constructor argument."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims


@dataclass
class ParallelModel:
    """What the trainer drives: the engine over this rank's part of the model."""

    engine: Any  # DeepSpeedEngine, or PipelineEngine with pipeline stages
    optimizer: Any
    scheduler: Any
    shared_heads: torch.Tensor  # (L, H) bool, the model's buffer (all layers, whatever the stage)
    layers: range  # the global indices of the layers this rank runs
    stage: Optional[Any] = None  # pipeline.StageContext with pipeline stages, else None

    @property
    def is_pipeline(self) -> bool:
        return self.stage is not None


def parallelize(model: torch.nn.Module, cfg: Config, dims: ParallelDims) -> ParallelModel:
    """TP -> compile -> pipeline split -> DeepSpeed engine, for this rank."""
    from megasink.parallel.engine import build_engine
    from megasink.train.schedule import lr_multiplier

    if dims.tp > 1:
        from megasink.parallel.tensor import apply_tensor_parallel

        model = apply_tensor_parallel(model, dims)
    if cfg.train.compile:  # config validation allows it with tp = pp = 1 only
        apply_compile(model, cfg.train.compile_backend)
    stage, module, layers = None, model, range(cfg.model.n_layers)
    if dims.pp > 1:
        from megasink.parallel.pipeline import build_pipeline_module

        module, stage = build_pipeline_module(model, cfg, dims)
        layers = stage.layers
    engine, optimizer, scheduler = build_engine(module, cfg, dims, lr_multiplier(cfg.train))
    if cfg.train.compile:
        check_aligned_parameters(model)
    return ParallelModel(engine, optimizer, scheduler, model.shared_heads, layers, stage)


def apply_compile(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place (``Module.compile``: parameter names and
    checkpoint keys unchanged). Blocks share their code, so all layers reuse one graph; the
    attention kernels are custom ops with fake functions, so a block is one graph
    (fullgraph) and a new batch layout (documents per batch) does not recompile it."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True)


def check_aligned_parameters(model: torch.nn.Module, align: int = 16) -> None:
    """Refuse to run compiled blocks on parameters off a 16-byte boundary. One compiled graph
    serves every block and its kernels keep the alignment that the first block's parameters had
    (torch does not check a parameter's address again); a later block's parameter that is off
    it faults ("CUDA error: misaligned address") or reads the wrong bytes. engine.param_groups
    lays DeepSpeed's flat buffers out so that none is; this says so if one ever is."""
    bad = [name for name, p in model.layers.named_parameters() if p.data_ptr() % align]
    if bad:
        raise RuntimeError(f"train.compile: {len(bad)} block parameters do not start on a {align}-byte boundary "
                           f"in the engine's buffers (first: layers.{bad[0]}); compiled kernels would fault on them. "
                           "Set train.compile=false, or report this with the DeepSpeed version and parallel settings")
