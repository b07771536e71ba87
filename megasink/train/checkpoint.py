"""Layout-independent checkpoints.

A checkpoint is a directory ``checkpoints/step_N/``::

    config.yaml          the resolved Config of the run
    model.safetensors    full (unsharded) fp32 weights, keyed like Transformer.state_dict()
                         (with pipeline stages: model-stageK-of-P.safetensors, one per stage)
    optim.safetensors    full AdamW moments: "exp_avg/<name>", "exp_avg_sq/<name>" (training only)
    state.json           step, scheduler, data loader position, counters, optimizer step
    rng_rank{r}.pt       per-rank RNG states (loaded only under the same world size)
    tokenizer.model      the sentencepiece model, when the run has one

Full tensors, whatever the tp/pp/dp/ZeRO layout that wrote them, so a checkpoint loads
under any other layout (each rank slices what it owns). The directory is written as
``step_N.tmp`` and renamed when complete; ``checkpoints/latest`` (a text file with the
directory name) is replaced atomically last. A crash at any point leaves ``latest`` naming
the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megasink.config import Config, load_config, save_config
from megasink.utils import atomic_write_text, fsync_dir

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A step directory from: a step directory, a checkpoints/ directory or a run directory."""
    p = Path(path)
    if _is_complete(p):
        return p
    for ckpts in (p, p / "checkpoints"):
        if (ckpts / LATEST).exists():
            name = (ckpts / LATEST).read_text().strip()
            target = ckpts / name
            if not _is_complete(target):
                raise FileNotFoundError(f"{ckpts / LATEST} names {name}, which is not a complete checkpoint")
            return target
    raise FileNotFoundError(f"no megasink checkpoint at {p} (expected model.safetensors or a 'latest' pointer)")


def _is_complete(p: Path) -> bool:
    return p.is_dir() and not p.name.endswith(".tmp") and any(p.glob("model*.safetensors"))


def load_model_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All model tensors of a checkpoint, merged over pipeline-stage files."""
    out: dict = {}
    for f in sorted(Path(ckpt_dir).glob("model*.safetensors")):
        out.update(load_tensors(f))
    return out


def load_optim_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    out: dict = {}
    for f in sorted(Path(ckpt_dir).glob("optim*.safetensors")):
        out.update(load_tensors(f))
    return out


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    try:
        return resolve_checkpoint_dir(Path(run_dir) / "checkpoints")
    except FileNotFoundError:
        return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (output.weight is kept only when untied)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def write_checkpoint_dir(target: Path, cfg: Config, model_sd: dict, optim_sd: Optional[dict] = None,
                         state: Optional[dict] = None, tokenizer: Optional[str] = None) -> None:
    """Write a complete checkpoint directory atomically (tmp dir + rename), no `latest` update."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_config(cfg, tmp / "config.yaml")
    save_tensors(tmp / "model.safetensors", model_sd)
    if optim_sd is not None:
        save_tensors(tmp / "optim.safetensors", optim_sd)
    if state is not None:
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
    if tokenizer and Path(tokenizer).exists():
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def update_latest(ckpt_root: Path, name: str) -> None:
    atomic_write_text(ckpt_root / LATEST, name + "\n")


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete step_N directories (never `latest`'s)."""
    latest = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).exists() else None
    steps = sorted((int(p.name.split("_")[1]), p) for p in ckpt_root.glob("step_*")
                   if p.is_dir() and not p.name.endswith(".tmp") and p.name.split("_")[1].isdigit())
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def save_model_checkpoint(model: torch.nn.Module, cfg: Config, out_dir: str | os.PathLike,
                          tokenizer: Optional[str] = None) -> Path:
    """Write a weights-only megasink checkpoint (as converters produce) at out_dir."""
    out = Path(out_dir)
    write_checkpoint_dir(out, cfg, full_state_dict(model), tokenizer=tokenizer)
    return out


def load_full_model(path: str | os.PathLike, map_location: str = "cpu"):
    """(model, cfg) on one device from any checkpoint (run dir, checkpoints dir or step dir)."""
    from megasink.model.transformer import Transformer

    ckpt = resolve_checkpoint_dir(path)
    cfg = load_config(ckpt / "config.yaml")
    model = Transformer(cfg.model, cfg.aux_loss)
    sd = load_model_tensors(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"output.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match config: missing {missing}, unexpected {unexpected}")
    return model.to(map_location), cfg
