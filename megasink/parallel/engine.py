"""DeepSpeed setup from the megasink config, and layout-independent optimizer state.

``build_engine`` wraps the (already parallelised) model in a DeepSpeed engine: AdamW with
no weight decay on norms, biases, sink logits and gate biases, the LR schedule, ZeRO
stage, precision and gradient clipping all come from the YAML. On a machine without GPUs
DeepSpeed runs on its CPU accelerator over gloo.

``full_param`` / ``full_optim_state`` read, and ``set_full_param`` / ``set_full_optim_state``
write, one parameter's fp32 master value and AdamW moments as *local-shard-shaped* tensors
whatever the ZeRO stage, so checkpoints can be written in full and loaded into any layout.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims

NO_DECAY_SUFFIXES = ("sinks", "gate_bias", "bias")


def import_deepspeed():
    """Import deepspeed for this machine: the CPU accelerator without GPUs, no shm op build."""
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed

    if cpu:  # skip a 44 s g++ build of the CPU shm comm op (on CUDA there is none; reading the
        # table there would probe every op builder with nvcc)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; norms (1-D), biases, sink logits, gate biases do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, dims: ParallelDims) -> dict:
    t = cfg.train
    # bf16: gradients accumulate over micro-batches in fp32 (DeepSpeed's default is the model's
    # dtype); ZeRO-1 then runs DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep fp32 accumulators.
    # Without ZeRO DeepSpeed cannot (ParallelDims.from_config refuses bf16 + accumulation there).
    fp32_accum = t.precision == "bf16" and cfg.parallel.zero > 0
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": dims.grad_accum_steps(cfg),
        "train_batch_size": t.global_batch_size,
        # DeepSpeed clips at 1.0 unless told: 0.0 really switches it off (docs/design.md, "Parallel layout")
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": cfg.parallel.zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_accum else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: Config, dims: ParallelDims, lr_lambda: Callable[[int], float]):
    """(engine, optimizer, scheduler) for `model` under `dims`."""
    deepspeed = import_deepspeed()
    t = cfg.train
    cuda = next(model.parameters()).is_cuda  # fused kernels on GPUs; the plain loop on CPUs
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            eps=1e-8, foreach=False, fused=cuda or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    is_pipe = type(model).__name__ == "PipelineModule"  # it brings its own grid (mpu)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, dims),
        mpu=None if is_pipe else dims, dist_init_required=False,
    )
    return engine, optimizer, scheduler


# ------------------------------------------------------------------ optimizer state, any ZeRO


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _uses_hp_mapping(p: torch.nn.Parameter) -> bool:
    """DeepSpeed's fragment API covers ZeRO-1/2 (``_hp_mapping``) and ZeRO-3 (``ds_id``)."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


def _unfused_master(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master of p (bf16 without ZeRO keeps fp32_groups beside the model), or p."""
    opt = engine.optimizer
    for g16, g32 in zip(getattr(opt, "fp16_groups", None) or [], getattr(opt, "fp32_groups", None) or []):
        for lp, hp in zip(g16, g32):
            if lp is p:
                return hp
    return p


def full_param(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """fp32 master value of p, shaped like the (TP-local) parameter. Collective under ZeRO."""
    if _uses_hp_mapping(p):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().clone()
    return _unfused_master(engine, p).detach().float().clone()


def full_optim_state(engine, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    if _uses_hp_mapping(p):
        from deepspeed.utils import safe_get_full_optimizer_state

        v = safe_get_full_optimizer_state(p, key)
        return None if v is None else v.detach().clone()
    st = _base_optimizer(engine).state.get(_unfused_master(engine, p), {})
    return st[key].detach().clone() if key in st else None


def set_full_param(engine, p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the fp32 master copy *and* the model's working copy (DeepSpeed only sets the
    former and would refresh the latter only at the next optimizer step)."""
    if _uses_hp_mapping(p):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(torch.float32))
    with torch.no_grad():
        master = _unfused_master(engine, p)
        if master is not p:
            master.copy_(value.to(master.dtype))
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's flat partition of the working copy
            import torch.distributed as dist

            part = p.ds_tensor
            n = part.numel()
            start = n * dist.get_rank(group=p.ds_process_group)
            chunk = value.flatten()[start:start + n].to(part.dtype)
            part.data.zero_()
            part.data[:chunk.numel()].copy_(chunk)
        else:
            p.data.copy_(value.to(p.dtype))


def set_full_optim_state(engine, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    if _uses_hp_mapping(p):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value.to(torch.float32), key)
    else:
        _base_optimizer(engine).state[_unfused_master(engine, p)][key].copy_(value)


def _master_tensors(engine) -> list:
    """The tensors AdamW actually steps: DeepSpeed's flat fp32 partitions, or the params."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if getattr(opt, attr, None):
            return list(getattr(opt, attr))
    if getattr(opt, "fp32_groups", None):  # bf16 without ZeRO: per-parameter fp32 masters
        return [hp for group in opt.fp32_groups for hp in group]
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def step_state(step: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    """AdamW's ``state["step"]`` as torch keeps it: on the parameter's device for fused or
    capturable groups (the fused kernel reads it there; a CPU step crashes ``_fused_adamw`` on
    CUDA), a CPU scalar otherwise (torch/optim/adam.py, "special device hosting for step")."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def _groups_by_tensor(engine) -> dict:
    return {id(t): g for g in _base_optimizer(engine).param_groups for t in g["params"]}


def ensure_optimizer_state(engine) -> None:
    """Create AdamW's state (step 0, zero moments) as torch's AdamW would on its first step,
    without touching any weight, so saved moments can be loaded into a fresh optimizer."""
    base = _base_optimizer(engine)
    groups = _groups_by_tensor(engine)
    for t in _master_tensors(engine):
        st = base.state[t]
        if "exp_avg" not in st:
            st["step"] = step_state(0, groups.get(id(t), {}), t)
            st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def relink_optimizer_states(engine) -> None:
    """Point DeepSpeed's per-parameter fragments at the current AdamW state.

    DeepSpeed links the fragments once, right after the *first group's* first step, so with
    several parameter groups (decay / no decay) the later groups stay unlinked. Re-linking
    when the state exists makes full_optim_state / set_full_optim_state see every group."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(engine) -> int:
    base = _base_optimizer(engine)
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def set_optimizer_step_count(engine, step: int) -> None:
    base = _base_optimizer(engine)
    groups = _groups_by_tensor(engine)
    for t, st in base.state.items():
        if "step" in st:
            st["step"] = step_state(step, groups.get(id(t), {}), t) if torch.is_tensor(st["step"]) else step
