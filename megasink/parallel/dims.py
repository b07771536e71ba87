"""ParallelDims: the tp x dp x pp layout, its process groups, passed explicitly everywhere.

Rank order (Megatron's and DeepSpeed's PipeModelDataParallelTopology): tensor-parallel
fastest, then data, then pipeline::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

It also serves DeepSpeed as its model-parallel unit (``mpu``): ZeRO shards optimizer state
across the data-parallel group only and computes gradient norms over the model-parallel one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megasink.config import Config, ConfigError


@dataclass
class ParallelDims:
    tp: int
    pp: int
    dp: int
    rank: int = 0
    groups: dict = field(default_factory=dict, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """This rank's device: cuda:LOCAL_RANK on GPU machines, else the CPU."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    @staticmethod
    def from_config(cfg: Config, world_size: int, rank: int = 0, where: str = "<config>") -> "ParallelDims":
        """Validate the layout against the world size and the model before any collective."""
        p, m = cfg.parallel, cfg.model
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"{where}: world size {world_size} is not divisible by parallel.tp * parallel.pp = {p.tp * p.pp}: "
                f"launch a multiple of {p.tp * p.pp} processes, e.g. torchrun --nproc_per_node {p.tp * p.pp} "
                "-m megasink.train ... (or srun; slurm/README.md)"
            )
        dp = p.dp or world_size // (p.tp * p.pp)
        if p.tp * p.pp * dp != world_size:
            raise ConfigError(
                f"{where}: world size {world_size} != parallel.tp ({p.tp}) * parallel.pp ({p.pp}) * "
                f"parallel.dp ({dp}); launch {p.tp * p.pp * dp} processes or set parallel.dp=0 to infer it"
            )
        if m.n_heads % p.tp:
            raise ConfigError(f"{where}: model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}")
        if m.n_layers % p.pp:
            raise ConfigError(f"{where}: model.n_layers={m.n_layers} is not divisible by parallel.pp={p.pp}")
        t = cfg.train
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"{where}: train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) * dp ({dp})"
            )
        accum = t.global_batch_size // per_step
        if t.precision == "bf16" and p.zero == 0 and accum > 1:
            raise ConfigError(
                f"{where}: train.precision=bf16 with gradient accumulation ({accum} micro-batches per step) needs "
                "parallel.zero_stage >= 1: without ZeRO DeepSpeed accumulates bf16 gradients in bf16; ZeRO keeps "
                "them in fp32")
        return ParallelDims(p.tp, p.pp, dp, rank)

    def grad_accum_steps(self, cfg: Config) -> int:
        return cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)

    def build_groups(self) -> None:
        """Create the tp/dp/pp/model-parallel groups. Every rank calls this in the same order."""
        ranks = range(self.world_size)
        by = {
            "tp": lambda r: (r // self.tp,),
            "dp": lambda r: (r % self.tp, r // (self.tp * self.dp)),
            "pp": lambda r: (r % (self.tp * self.dp),),
            "mp": lambda r: ((r // self.tp) % self.dp,),  # tp x pp: everything but data
        }
        for name, key in by.items():
            buckets: dict = {}
            for r in ranks:
                buckets.setdefault(key(r), []).append(r)
            for members in sorted(buckets.values()):
                group = dist.new_group(members)
                if self.rank in members:
                    self.groups[name] = group
                    self.groups[name + "_ranks"] = members

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        return self.groups.get(name)

    # ---- DeepSpeed mpu interface -------------------------------------------------------
    def get_model_parallel_rank(self):
        return self.tp_rank + self.tp * self.pp_rank

    def get_model_parallel_world_size(self):
        return self.tp * self.pp

    def get_model_parallel_group(self):
        return self.groups["mp"]

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.groups["dp"]

    def get_tensor_model_parallel_rank(self):
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.groups["tp"]

    def get_pipeline_model_parallel_rank(self):
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.groups["pp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's environment (1 process otherwise)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(cfg: Config, where: str = "<config>") -> ParallelDims:
    """Validate the layout, then start the process group and build the groups."""
    rank, world, local_rank = env_world()
    dims = ParallelDims.from_config(cfg, world, rank, where)  # before any collective
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if world == 1:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    # on GPUs: NCCL for CUDA tensors, gloo for the few CPU scalars (flags, loss means) the
    # trainer reduces; subgroups inherit both
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dims.device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    dims.build_groups()
    return dims


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
