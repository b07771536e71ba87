"""DeepSpeed setup from the megasink config, and layout-independent optimizer state.

``build_engine`` wraps the (already parallelised) model in a DeepSpeed engine: AdamW with
no weight decay on norms, biases, sink logits and gate biases, the LR schedule, ZeRO
stage, precision and gradient clipping all come from the YAML. On a machine without GPUs
DeepSpeed runs on its CPU accelerator over gloo.

Optimizer state whatever the ZeRO stage (docs/design.md, "File formats and contracts"):
``local_master`` / ``set_local_master`` read and write the part of one parameter's fp32 master
and AdamW moments this rank holds (``master_range``: its ZeRO-3 partition, its ZeRO-1/2
fragment, or all of it), ``set_working`` the model's working copy; sharded checkpoints save
and load through them. ``full_param`` / ``full_optim_state`` gather a whole (TP-local)
parameter for the unsharded format.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megasink.config import Config
from megasink.parallel.dims import ParallelDims

NO_DECAY_SUFFIXES = ("sinks", "gate_bias", "bias")
# 16 bytes of the narrowest training dtype (bf16 / fp16): the alignment compiled kernels assume
ALIGN_ELEMENTS = 8


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
    """AdamW groups: matrices decay; norms (1-D), biases, sink logits, gate biases do not.

    Every parameter starts on a 16-byte boundary. DeepSpeed flattens each group into one
    buffer and makes the parameters views into it, so a parameter whose size is not a multiple
    of 16 bytes (10 heads' sink logits or gate biases: 20 bytes in bf16) shifts every later one
    off that boundary, by a different amount in each layer. A compiled block's kernels take the
    alignment of the parameters they were compiled with (one graph serves every layer, and
    torch checks no parameter's address again) and fault on the others: "CUDA error:
    misaligned address" on an H200 with bf16 ZeRO-1. Such a parameter gets a group of its own."""
    decay, no_decay, alone = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES) else weight_decay
        if p.numel() % ALIGN_ELEMENTS:
            alone.append({"params": [p], "weight_decay": wd})
        else:
            (decay if wd else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}] + alone


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


def master_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, numel) of the elements of p (flattened, TP-local) whose fp32 master and AdamW
    moments this rank holds (``local_master``): its ZeRO-3 partition, its ZeRO-1/2 fragment
    ((0, 0) when it has none), or all of p without ZeRO."""
    if hasattr(p, "ds_id"):
        import torch.distributed as dist

        n = p.ds_tensor.numel()  # partitions are padded to equal sizes
        start = min(n * dist.get_rank(group=p.ds_process_group), p.ds_numel)
        return start, min(n, p.ds_numel - start)
    if hasattr(p, "_hp_mapping"):
        frag = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
        return (frag.start, frag.numel) if frag is not None else (0, 0)
    return 0, p.numel()


def local_shape(p: torch.nn.Parameter) -> tuple:
    """p's TP-local shape (ZeRO-3 keeps it beside the empty working tensor)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)


def working_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, numel): the elements of p's working copy this rank keeps (``set_working``)."""
    return master_range(p) if hasattr(p, "ds_id") else (0, p.numel())


def saved_range(p: torch.nn.Parameter, dims: ParallelDims) -> tuple[int, int]:
    """(start, numel) of p that this rank writes into a sharded checkpoint: what it owns under
    ZeRO-1/2/3; without ZeRO every data-parallel rank holds all of p and writes 1/dp of it."""
    start, n = master_range(p)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        return start, n
    chunk = -(-n // dims.dp)
    first = min(dims.dp_rank * chunk, n)
    return first, min(chunk, n - first)


def local_master(engine, p: torch.nn.Parameter, key: Optional[str] = None) -> Optional[torch.Tensor]:
    """p's fp32 master (``key`` None) or AdamW moment ``key`` over ``master_range(p)``, 1-D, as a
    view of the optimizer's own tensor (no copy on the CPU); None when the moment does not exist."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        if key is not None and not _has_state(engine):
            return None
        v = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        return v.detach().view(-1)[:master_range(p)[1]]
    if hasattr(p, "_hp_mapping"):
        m = p._hp_mapping
        if m is None:
            return torch.empty(0, dtype=torch.float32, device=p.device)
        if key is not None and key not in (m.optim_fragment or {}):
            return None
        return m.get_hp_fragment(key).detach().view(-1)
    master = _unfused_master(engine, p)
    if key is None:
        return master.detach().view(-1)
    st = _base_optimizer(engine).state.get(master, {})
    return st[key].detach().view(-1) if key in st else None


def set_local_master(engine, p: torch.nn.Parameter, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Set p's fp32 master (``key`` None) or moment ``key`` over ``master_range(p)`` from the 1-D
    ``value`` (the moments must exist: ``ensure_optimizer_state``)."""
    value = value.to(torch.float32).view(-1)
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device)
        padded[:value.numel()].copy_(value)  # the last partition is padded
        if key is None:
            safe_set_local_fp32_param(p, padded)
        else:
            safe_set_local_optimizer_state(p, padded, key)
        return
    target = local_master(engine, p, key)
    if target is None:
        raise RuntimeError(f"AdamW state {key!r} does not exist yet: call ensure_optimizer_state first")
    with torch.no_grad():
        target.copy_(value)


def set_working(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the model's working copy of p over ``working_range(p)`` from the 1-D ``value`` (DeepSpeed
    sets only the fp32 master and would refresh the working copy at the next optimizer step)."""
    with torch.no_grad():
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's flat partition of the working copy
            part = p.ds_tensor.data
            part.zero_()
            part[:value.numel()].copy_(value.view(-1))
        else:
            p.data.view(-1).copy_(value.view(-1))


def _has_state(engine) -> bool:
    return any("exp_avg" in st for st in _base_optimizer(engine).state.values())


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
    when the state exists makes local_master / full_optim_state see every group."""
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
