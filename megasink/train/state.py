"""Saving and restoring a training run under any parallel layout.

``save_training_state`` writes the sharded format of ``megasink/checkpoint.py``: every rank
writes the pieces it owns of each parameter's fp32 master and AdamW moments (its ZeRO-1/2
fragment, its ZeRO-3 partition, or without ZeRO 1/dp of its TP shard; TP-replicated tensors
from TP rank 0 only, a tied embedding from the first pipeline stage only) into its own two
files, in parallel, straight from the optimizer's memory (``engine.local_master``). Rank 0
gathers the ranks' piece lists and writes state.json, config and tokenizer, then the
manifest (atomically, last), renames ``step_N.tmp`` and updates ``latest``.

``load_training_state`` reads either format under any layout: each rank reads the range of
its TP part it keeps (its ZeRO-3 partition; otherwise the whole part for the working copy)
and the range of the moments it holds (``engine.master_range``), nothing else, one tensor at
a time. ``sharded=False`` writes the unsharded format (full tensors gathered onto one rank per
pipeline stage), kept for comparison (benchmarks/checkpoint_io.py).
"""
from __future__ import annotations

import dataclasses
import io
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
from megasink.parallel.state_utils import gather_tp_tensor
from megasink import checkpoint as ckpt
from megasink.utils import atomic_write_bytes, atomic_write_text, fsync_dir

MOMENTS = ckpt.MOMENTS


def _named_params(engine, dims: ParallelDims):
    """(Transformer state_dict name, parameter, whether this rank writes it) for this rank's parameters:
    a copy of a tied embedding past the first pipeline stage is not written (the first stage has it)."""
    named = list(engine.module.named_parameters())
    if type(engine.module).__name__ != "PipelineModule":
        return [(n, p, True) for n, p in named]
    from megasink.parallel.pipeline import TIED_PREFIX, canonical_name

    return [(canonical_name(n), p, not (n.startswith(TIED_PREFIX) and dims.pp_rank > 0)) for n, p in named]


def _split(p: torch.nn.Parameter, dims: ParallelDims) -> Optional[tuple]:
    """This rank's TP part of p as the checkpoint reader names it, or None (not split)."""
    dim = getattr(p, "tp_shard_dim", None)
    return None if dim is None or dims.tp == 1 else (dim, dims.tp, dims.tp_rank)


def save_training_state(engine, cfg: Config, dims: ParallelDims, step: int, state: dict,
                        keep_last: int, shared_heads: Optional[torch.Tensor] = None,
                        in_use: Collection[str] = (), sharded: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``in_use``: rank
    0's checkpoint names that pruning must keep (background evaluations still read them)."""
    root = Path(cfg.run_dir) / "checkpoints"
    final = root / ckpt.step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    stepped = eng.optimizer_step_count(engine) > 0
    if stepped:
        eng.relink_optimizer_states(engine)
    write = _write_shards if sharded else _write_full
    report = write(engine, dims, tmp, stepped, shared_heads if dist.get_rank() == 0 else None)
    rng = io.BytesIO()
    torch.save(_rng_state(), rng)
    atomic_write_bytes(tmp / f"rng_rank{dist.get_rank()}.pt", rng.getvalue())  # fsynced by the rank that wrote it
    reports = [None] * dims.world_size if dist.get_rank() == 0 else None
    dist.gather_object(report, reports, dst=0)  # every rank's files are written and fsynced
    if dist.get_rank() == 0:
        layout = {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero": engine.zero_optimization_stage()}
        state = {**state, "step": step, "optimizer_step": eng.optimizer_step_count(engine),
                 "world_size": dims.world_size, "layout": layout}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
        save_config(cfg, tmp / "config.yaml")
        ckpt.save_tokenizer(cfg.data.tokenizer, tmp)  # each file fsynced by its writer, on its own node
        if sharded:  # last: the manifest marks the checkpoint complete
            manifest = ckpt.build_manifest(reports, step, layout)
            atomic_write_text(tmp / ckpt.MANIFEST, json.dumps(manifest, separators=(",", ":")))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        ckpt.update_latest(root, final.name)  # last: the checkpoint is complete
        ckpt.prune_checkpoints(root, keep_last, in_use)
    dist.barrier()
    return final


def _write_shards(engine, dims: ParallelDims, tmp: Path, stepped: bool,
                  shared_heads: Optional[torch.Tensor]) -> dict:
    """Write the pieces this rank owns into its model and optim files; return its report for
    ``checkpoint.build_manifest``. The tensors written are views of the optimizer's own memory."""
    rank, world = dist.get_rank(), dims.world_size
    files = {"model": ckpt.shard_file("model", rank, world), "optim": ckpt.shard_file("optim", rank, world)}
    kinds = ("model", *MOMENTS) if stepped else ("model",)
    tensors: dict = {"model": {}, "optim": {}}
    pieces = []
    for name, p, writes in _named_params(engine, dims):
        split = _split(p, dims)
        start, n = eng.saved_range(p, dims)
        if not writes or n == 0 or (split is None and dims.tp_rank != 0):  # TP replicas: TP rank 0 writes
            continue
        first = eng.master_range(p)[0]
        for kind in kinds:
            key = f"{kind}/{name}@{0 if split is None else split[2]}:{start}"
            values = eng.local_master(engine, p, None if kind == "model" else kind)
            if values is None:
                raise RuntimeError(f"rank {rank}: no AdamW {kind} for {name} after the optimizer stepped")
            tensors["model" if kind == "model" else "optim"][key] = values.narrow(0, start - first, n)
            pieces.append({"kind": kind, "name": name, "dtype": "F32", "part_shape": list(eng.local_shape(p)),
                           "dim": None if split is None else split[0], "parts": 1 if split is None else split[1],
                           "part": 0 if split is None else split[2], "start": start, "numel": n,
                           "file": files["model" if kind == "model" else "optim"], "key": key})
    if shared_heads is not None:
        key = "model/shared_heads@0:0"
        tensors["model"][key] = shared_heads.detach().reshape(-1)
        pieces.append({"kind": "model", "name": "shared_heads", "dtype": "BOOL", "part_shape": list(shared_heads.shape),
                       "dim": None, "parts": 1, "part": 0, "start": 0, "numel": shared_heads.numel(),
                       "file": files["model"], "key": key})
    sizes = {files["model"]: ckpt.save_tensors(tmp / files["model"], tensors["model"])}
    if stepped:
        sizes[files["optim"]] = ckpt.save_tensors(tmp / files["optim"], tensors["optim"])
    return {"files": sizes, "pieces": pieces}


def _write_full(engine, dims: ParallelDims, tmp: Path, stepped: bool, shared_heads: Optional[torch.Tensor]) -> None:
    """The unsharded format: full tensors gathered (collective under ZeRO and TP) and written by
    each pipeline stage's first rank (tp_rank 0, dp_rank 0)."""
    model_sd, optim_sd = {}, {}
    for name, p, _ in _named_params(engine, dims):  # collective under ZeRO (all ranks, same order)
        dim = getattr(p, "tp_shard_dim", None)
        model_sd[name] = gather_tp_tensor(eng.full_param(engine, p), dim, dims)
        for key in MOMENTS if stepped else ():
            v = eng.full_optim_state(engine, p, key)
            if v is not None:
                optim_sd[f"{key}/{name}"] = gather_tp_tensor(v, dim, dims)
    if shared_heads is not None:  # rank 0: the first stage's writer
        model_sd["shared_heads"] = shared_heads
    if dims.tp_rank == 0 and dims.dp_rank == 0:
        suffix = "" if dims.pp == 1 else f"-stage{dims.pp_rank}-of-{dims.pp}"
        ckpt.save_tensors(tmp / f"model{suffix}.safetensors", model_sd)
        if optim_sd:
            ckpt.save_tensors(tmp / f"optim{suffix}.safetensors", optim_sd)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def load_training_state(engine, ckpt_dir: Path, dims: ParallelDims,
                        shared_heads: Optional[torch.Tensor] = None) -> dict:
    """Collective: load weights, moments, step counts, RNG (and the shared-heads mask into
    `shared_heads`) into the engine from a checkpoint of either format and any layout; return
    state.json. Each rank reads only the ranges it keeps, one tensor at a time."""
    state = json.loads((ckpt_dir / "state.json").read_text()) if (ckpt_dir / "state.json").exists() else {}
    with ckpt.CheckpointReader(ckpt_dir) as reader:
        moments = all(reader.names(kind) for kind in MOMENTS)
        if moments:
            eng.ensure_optimizer_state(engine)
            eng.relink_optimizer_states(engine)
        for name, p, _ in _named_params(engine, dims):
            _load_param(engine, reader, name, p, dims, moments)
        if shared_heads is not None and reader.has("shared_heads"):
            shared_heads.copy_(reader.read_full("shared_heads"))
    if moments and "optimizer_step" in state:
        eng.set_optimizer_step_count(engine, state["optimizer_step"])
    rng = ckpt_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists() and state.get("world_size") == dims.world_size:
        st = torch.load(rng, weights_only=True)
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda"])
    return state


def _load_param(engine, reader, name: str, p: torch.nn.Parameter, dims: ParallelDims, moments: bool) -> None:
    """p's working copy, fp32 master and (``moments``) AdamW moments from ``reader``: the ranges
    this rank keeps of its TP part."""
    split = _split(p, dims)
    if not reader.has(name):
        raise ckpt.CheckpointError(f"{reader.dir}: parameter {name} is missing from the checkpoint; it holds "
                                   "another model (resume with that checkpoint's model section)")
    if reader.shape(name, split=split) != eng.local_shape(p):
        raise ckpt.CheckpointError(f"{reader.dir}: {name} is {reader.shape(name)} (this rank's part "
                                   f"{reader.shape(name, split=split)}), the model's part is {eng.local_shape(p)}")
    w0, wn = eng.working_range(p)
    working = reader.read(name, "model", split, w0, w0 + wn)
    eng.set_working(p, working)
    m0, mn = eng.master_range(p)
    eng.set_local_master(engine, p, working[m0 - w0:m0 - w0 + mn])
    for key in MOMENTS if moments else ():
        eng.set_local_master(engine, p, reader.read(name, key, split, m0, m0 + mn), key)


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
