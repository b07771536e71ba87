"""Saving and restoring a training run under any parallel layout.

Writes the layout-independent format of ``checkpoint.py``: every parameter and its AdamW
moments as full tensors. Each pipeline stage's first rank (tp_rank 0, dp_rank 0) writes
its stage's tensors into ``step_N.tmp``; rank 0 writes state.json, then renames the
directory and updates ``latest`` after everyone has finished (so ``latest`` never names a
partial checkpoint). Loading slices each rank's shard out of the full tensors, so a run
saved with tp=2 x pp=2 resumes with tp=1 x pp=1 and back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Collection, Optional

import torch
import torch.distributed as dist

from megasink.config import Config, load_config, save_config
from megasink.errors import UserError
from megasink.parallel import engine as eng
from megasink.parallel.dims import ParallelDims
from megasink.parallel.state_utils import gather_tp_tensor, slice_tp_tensor
from megasink import checkpoint as ckpt
from megasink.utils import atomic_write_text, fsync_dir

MOMENTS = ("exp_avg", "exp_avg_sq")


def _gather_tp(t: torch.Tensor, p: torch.nn.Parameter, dims: ParallelDims) -> torch.Tensor:
    return gather_tp_tensor(t, getattr(p, "tp_shard_dim", None), dims)


def _slice_tp(full: torch.Tensor, p: torch.nn.Parameter, dims: ParallelDims) -> torch.Tensor:
    return slice_tp_tensor(full, getattr(p, "tp_shard_dim", None), dims)


def _named_params(engine):
    """(Transformer state_dict name, parameter) for this rank's parameters."""
    named = list(engine.module.named_parameters())
    if type(engine.module).__name__ == "PipelineModule":
        from megasink.parallel.pipeline import canonical_name

        named = [(canonical_name(n), p) for n, p in named]
    return named


def save_training_state(engine, cfg: Config, dims: ParallelDims, step: int, state: dict,
                        keep_last: int, shared_heads: Optional[torch.Tensor] = None,
                        in_use: Collection[str] = ()) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``in_use``: rank
    0's checkpoint names that pruning must keep (background evaluations still read them)."""
    root = Path(cfg.run_dir) / "checkpoints"
    final = root / ckpt.step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if eng.optimizer_step_count(engine) > 0:
        eng.relink_optimizer_states(engine)
    model_sd, optim_sd = {}, {}
    for name, p in _named_params(engine):  # collective under ZeRO (all ranks, same order)
        model_sd[name] = _gather_tp(eng.full_param(engine, p), p, dims)
        for key in MOMENTS:
            v = eng.full_optim_state(engine, p, key)
            if v is not None:
                optim_sd[f"{key}/{name}"] = _gather_tp(v, p, dims)
    if shared_heads is not None and dims.pp_rank == 0:
        model_sd["shared_heads"] = shared_heads
    writer = dims.tp_rank == 0 and dims.dp_rank == 0
    suffix = "" if dims.pp == 1 else f"-stage{dims.pp_rank}-of-{dims.pp}"
    if writer:
        ckpt.save_tensors(tmp / f"model{suffix}.safetensors", model_sd)
        if optim_sd:
            ckpt.save_tensors(tmp / f"optim{suffix}.safetensors", optim_sd)
    torch.save(_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        state = {**state, "step": step, "optimizer_step": eng.optimizer_step_count(engine),
                 "world_size": dims.world_size, "layout": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
        save_config(cfg, tmp / "config.yaml")
        ckpt.save_tokenizer(cfg.data.tokenizer, tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        ckpt.update_latest(root, final.name)  # last: the checkpoint is complete
        ckpt.prune_checkpoints(root, keep_last, in_use)
    dist.barrier()
    return final


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def load_training_state(engine, ckpt_dir: Path, dims: ParallelDims,
                        shared_heads: Optional[torch.Tensor] = None) -> dict:
    """Collective: load weights, moments, step counts, RNG (and the shared-heads mask into
    `shared_heads`) into the engine; return state.json."""
    model_sd = ckpt.load_model_tensors(ckpt_dir)
    optim_sd = ckpt.load_optim_tensors(ckpt_dir)
    state = json.loads((ckpt_dir / "state.json").read_text()) if (ckpt_dir / "state.json").exists() else {}
    if optim_sd:
        eng.ensure_optimizer_state(engine)
        eng.relink_optimizer_states(engine)
    for name, p in _named_params(engine):
        if name not in model_sd:
            raise KeyError(f"{ckpt_dir}: parameter {name} missing from the checkpoint")
        eng.set_full_param(engine, p, _slice_tp(model_sd[name], p, dims))
        for key in MOMENTS if optim_sd else ():
            eng.set_full_optim_state(engine, p, key, _slice_tp(optim_sd[f"{key}/{name}"], p, dims))
    if shared_heads is not None and "shared_heads" in model_sd:
        shared_heads.copy_(model_sd["shared_heads"])
    if optim_sd and "optimizer_step" in state:
        eng.set_optimizer_step_count(engine, state["optimizer_step"])
    rng = ckpt_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists() and state.get("world_size") == dims.world_size:
        st = torch.load(rng, weights_only=True)
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda"])
    return state


def find_resume_dir(cfg: Config) -> Optional[Path]:
    """The checkpoint this run resumes from (None: a fresh start), the same on every rank.

    Collective when a process group is up: rank 0 inspects the files and broadcasts its
    choice, or the error that stops every rank. ``train.resume: auto`` skips a damaged
    ``latest`` for the newest complete checkpoint and says so."""
    choice = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            choice = _pick_resume_dir(cfg)
        except (UserError, OSError) as e:
            error = e if isinstance(e, UserError) else ckpt.CheckpointError(f"train.resume={cfg.train.resume}: {e}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice and str(choice), error and str(error)]
        dist.broadcast_object_list(box, src=0)
        if dist.get_rank() != 0:
            choice, error = box[0] and Path(box[0]), box[1] and ckpt.CheckpointError(box[1])
    if error:
        raise error
    return choice


def _pick_resume_dir(cfg: Config) -> Optional[Path]:
    r = cfg.train.resume
    if r == "none":
        return None
    if r != "auto":
        choice = ckpt.resolve_checkpoint_dir(r)
    else:
        choice, note = ckpt.resume_candidate(Path(cfg.run_dir) / "checkpoints")
        if note:
            print(f"[megasink] warning: {note}", file=sys.stderr, flush=True)
    if choice is not None:
        check_resumable(choice, cfg)
    return choice


# ModelConfig fields a resumed run may change: they set how weights start or how attention is
# computed, not what the weights are
RESUMABLE_MODEL_CHANGES = ("attention_backend", "init_std", "sink_init", "gate_bias_init", "seq_len")


def check_resumable(ckpt_dir: Path, cfg: Config) -> None:
    """Refuse, naming every differing key, to resume ``cfg`` from a checkpoint of another model
    (before anything is loaded or written)."""
    saved = load_config(ckpt_dir / "config.yaml").model
    diffs = [f"model.{f.name}={getattr(saved, f.name)!r} (this config: {getattr(cfg.model, f.name)!r})"
             for f in dataclasses.fields(saved)
             if f.name not in RESUMABLE_MODEL_CHANGES and getattr(saved, f.name) != getattr(cfg.model, f.name)]
    if diffs:
        raise ckpt.CheckpointError(
            f"cannot resume from {ckpt_dir}: it holds another model: {', '.join(diffs)}; use that checkpoint's "
            "model section, or start a new run (another run_dir, or train.resume=none)")
