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

A checkpoint is *complete* when cheap, certain checks pass (``checkpoint_problem``): every
expected file is present (per pipeline stage, per rank's RNG), each safetensors header
parses and the file's size is the one that header describes, and ``state.json`` and
``config.yaml`` parse. A damaged one is named, never loaded; ``train.resume: auto`` falls
back to the newest complete checkpoint (``resume_candidate``), and pruning counts only
complete ones.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Collection, Optional

import torch
import yaml

from megasink.config import Config, load_config, save_config
from megasink.errors import UserError
from megasink.utils import atomic_write_text, fsync_dir, set_default_mode

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: the message names the directory or file and what to do."""


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The complete step directory that ``path`` names: a step directory, or a checkpoints/ or
    run directory through its ``latest``. A damaged one is an error naming the damaged file
    (and the newest complete checkpoint to use instead); no checkpoint at all is FileNotFoundError."""
    p = Path(path)
    if _looks_like_step_dir(p):
        problem = checkpoint_problem(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is damaged: {problem}")
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).exists():
            target, problem = _latest_target(root)
            if problem is None:
                return target
            fallback = newest_complete(root)
            hint = (f"the newest complete checkpoint is {fallback}: pass it explicitly" if fallback
                    else "no complete checkpoint is left")
            raise CheckpointError(f"{root / LATEST} names {target.name}, which is not usable: {problem}; {hint}")
    raise FileNotFoundError(f"no megasink checkpoint at {p} (expected model.safetensors or a 'latest' pointer)")


def resume_candidate(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint to resume from, note) for ``train.resume: auto`` over checkpoints/ ``root``.

    ``latest`` when it is complete; else the newest complete checkpoint, with a note naming
    what was damaged; (None, None) when there is no checkpoint at all. Raises CheckpointError
    when checkpoints exist but none is usable."""
    names = [p.name for p in _step_dirs(root)]
    if not (root / LATEST).exists() and not names:
        return None, None
    target, problem = _latest_target(root) if (root / LATEST).exists() else (None, "checkpoints/latest is missing")
    if problem is None:
        return target, None
    fallback = newest_complete(root)
    if fallback is None:
        raise CheckpointError(f"cannot resume from {root}: {problem}, and no other checkpoint is complete "
                              f"({', '.join(names) or 'none'}); set train.resume=none to start over")
    return fallback, f"{problem}: resuming from {fallback.name}, the newest complete checkpoint"


def _latest_target(root: Path) -> tuple[Path, Optional[str]]:
    """(the directory ``root/latest`` names, its problem or None)."""
    name = (root / LATEST).read_text().strip()
    target = root / name
    return target, (checkpoint_problem(target) if name else f"{root / LATEST} is empty")


def newest_complete(root: Path) -> Optional[Path]:
    """The complete step_N directory with the largest N under ``root``, or None."""
    return next((p for p in reversed(_step_dirs(root)) if checkpoint_problem(p) is None), None)


def _step_dirs(root: Path) -> list[Path]:
    """``root/step_N`` directories (no .tmp), by N ascending."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return [p for _, p in sorted(found)]


def _looks_like_step_dir(p: Path) -> bool:
    return p.is_dir() and not (p / LATEST).exists() and (any(p.glob("*.safetensors")) or (p / "state.json").exists())


def checkpoint_problem(step_dir: Path) -> Optional[str]:
    """None when ``step_dir`` is a complete checkpoint, else what is wrong, naming the file."""
    d = Path(step_dir)
    if d.name.endswith(".tmp"):
        return f"{d} is an unfinished save (a step directory is renamed from .tmp when complete)"
    if not d.is_dir():
        return f"{d} does not exist" + (" (only its unfinished .tmp does)" if d.with_name(d.name + ".tmp").exists() else "")
    state, problem = _parsed(d / "state.json", json.loads) if (d / "state.json").exists() else (None, None)
    problem = problem or _parsed(d / "config.yaml", yaml.safe_load)[1]
    if problem is not None:
        return problem
    missing = [f for f in _expected_files(d, state) if not (d / f).is_file()]
    if missing:
        return f"{d / missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    for f in sorted(d.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def _parsed(path: Path, parse) -> tuple[Optional[dict], Optional[str]]:
    """(the file parsed as a mapping, None) or (None, what is wrong with it)."""
    if not path.exists():
        return None, f"{path} is missing"
    try:
        value = parse(path.read_text())
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"{path} does not parse ({type(e).__name__}: {' '.join(str(e).split())})"  # one line
    if not isinstance(value, dict):
        return None, f"{path} does not hold a mapping"
    return value, None


def _expected_files(d: Path, state: Optional[dict]) -> list[str]:
    """Files a complete checkpoint has: weights (one per pipeline stage); for a training
    checkpoint (with state.json) also its AdamW moments once the optimizer has stepped and
    every rank's RNG state."""
    has_training_files = any(d.glob("optim*.safetensors")) or any(d.glob("rng_rank*.pt"))
    if state is None:
        return ["state.json"] if has_training_files else ["model.safetensors"]
    pp = state.get("layout", {}).get("pp", 1)
    stages = ["" if pp == 1 else f"-stage{k}-of-{pp}" for k in range(pp)]
    files = [f"model{s}.safetensors" for s in stages]
    if state.get("optimizer_step", 0) > 0:
        files += [f"optim{s}.safetensors" for s in stages]
    return files + [f"rng_rank{r}.pt" for r in range(state.get("world_size", 0))]


def safetensors_problem(path: Path) -> Optional[str]:
    """None when the header of safetensors file ``path`` parses and describes exactly its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"{path} is truncated ({size} bytes; its header does not fit)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"{path}: the safetensors header does not parse ({type(e).__name__}: {e})"
    if 8 + n + end != size:
        return f"{path} is {size} bytes but its header describes {8 + n + end}: truncated or overwritten"
    return None


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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    set_default_mode(path)  # save_file creates owner-only (0600) files


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
    save_tokenizer(tokenizer, tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def save_tokenizer(tokenizer: Optional[str], ckpt_dir: Path) -> None:
    """Copy the run's tokenizer (``data.tokenizer``) into a checkpoint directory being written, as
    plain files beside the weights: a sentencepiece model as ``tokenizer.model``, a Hugging Face
    tokenizer as its ``tokenizer.json``, ``tokenizer_config.json``, ... (same identity as the
    original: ``megasink.data.tokenizer``). The step directory is then itself a tokenizer path."""
    if tokenizer and Path(tokenizer).exists():
        from megasink.data.tokenizer import copy_tokenizer

        copy_tokenizer(tokenizer, ckpt_dir)


def update_latest(ckpt_root: Path, name: str) -> None:
    atomic_write_text(ckpt_root / LATEST, name + "\n")


def prune_checkpoints(ckpt_root: Path, keep_last: int, in_use: Collection[str] = ()) -> None:
    """Delete all but the newest ``keep_last`` complete step_N directories, never ``latest``'s
    nor those named in ``in_use`` (still read by a background evaluation; a later save prunes
    them). Only complete checkpoints count: a damaged one never displaces a complete one
    (damaged directories are left for inspection)."""
    if keep_last <= 0:
        return
    latest = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).exists() else None
    complete = [p for p in _step_dirs(ckpt_root) if checkpoint_problem(p) is None]
    for p in complete[:-keep_last]:
        if p.name != latest and p.name not in in_use:
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
