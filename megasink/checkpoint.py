"""Layout-independent checkpoints (docs/design.md, "File formats and contracts").

A checkpoint is a directory ``checkpoints/step_N/`` in one of two formats, told apart by the
files present. *Sharded* (training; ``manifest.json`` present): each rank wrote only what it
owns (its ZeRO partition of the fp32 master weights and AdamW moments of its TP shard; without
ZeRO, 1/dp of them) as 1-D pieces into ``model-rank{r}-of-{W}.safetensors`` and
``optim-rank{r}-of-{W}.safetensors``; ``manifest.json``, written last, maps each tensor to its
pieces::

    {"format": "megasink-sharded", "version": 1, "step": N, "layout": {"tp", "pp", "dp", "zero"},
     "files": {file: bytes},
     "tensors": {"model" | "exp_avg" | "exp_avg_sq": {<Transformer state_dict name>:
         {"shape": full shape, "dtype": "F32", "split": {"dim": d, "sizes": [...]} | null,
          "pieces": [{"file", "key", "part", "start", "numel"}]}}}}

A piece holds elements [start, start + numel) of TP part ``part`` (the ``torch.chunk`` of the
full tensor along ``split.dim`` that TP rank held), flattened. *Unsharded* (converters'
weights-only checkpoints, and training checkpoints written before sharding): full tensors in
``model.safetensors`` (per pipeline stage ``model-stageK-of-P.safetensors``) and
``optim.safetensors`` ("exp_avg/<name>", "exp_avg_sq/<name>"). Both carry ``config.yaml``,
``state.json`` (step, scheduler, data position, counters, optimizer step, layout),
``rng_rank{r}.pt`` (restored only under the same world size) and the run's tokenizer.

``CheckpointReader`` (in ``megasink/checkpoint_shards.py`` with the manifest's code) reads
either format under any layout: a rank asks for a flat range of the TP part it holds and only
the bytes of the pieces that overlap it are read (an unsharded tensor is one piece). Whole
tensors are read one at a time, TP parts joined per tensor, so ``load_full_model``, the HF
export and eval hold at most the model plus one tensor.

The directory is written as ``step_N.tmp`` and renamed when complete; ``checkpoints/latest``
is replaced atomically last, so a crash leaves it naming the previous complete checkpoint.
A checkpoint is *complete* when cheap, certain checks pass (``checkpoint_problem``): the
expected files are present (the manifest and each file it names, at the size it records; or
one per pipeline stage), safetensors headers parse and describe their file's size, the
manifest's pieces tile every tensor, and ``state.json`` and ``config.yaml`` parse. A damaged
one is named, never loaded; ``train.resume: auto`` falls back to the newest complete
checkpoint (``resume_candidate``), and pruning counts only complete ones.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Collection, Optional

import torch
import yaml

from megasink.config import Config, load_config, save_config
from megasink import safetensors_io as stio
from megasink.checkpoint_shards import (  # noqa: F401 (the format's API, re-exported here)
    MANIFEST, MOMENTS, CheckpointError, CheckpointReader, LazyTensors, build_manifest, is_sharded, load_model_tensors,
    load_optim_tensors, manifest_problem, parsed as _parsed)
from megasink.utils import atomic_write_text, fsync_dir

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


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
    return p.is_dir() and not (p / LATEST).exists() and (
        any(p.glob("*.safetensors")) or (p / "state.json").exists() or (p / MANIFEST).exists())


def shard_file(kind: str, rank: int, world_size: int) -> str:
    """The file rank ``rank`` writes its pieces of ``kind`` ("model" or "optim") into."""
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


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
    if is_sharded(d):
        problem = _sharded_problem(d, state)
    else:
        missing = [f for f in _expected_files(d, state) if not (d / f).is_file()]
        problem = missing and (f"{d / missing[0]} is missing" +
                               (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if problem:
        return problem
    for f in sorted(d.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def _sharded_problem(d: Path, state: Optional[dict]) -> Optional[str]:
    """What is wrong with a sharded checkpoint's manifest and the files it names, or None."""
    if not (d / MANIFEST).exists():
        return f"{d / MANIFEST} is missing (a sharded save writes it last: the save did not finish)"
    manifest, problem = _parsed(d / MANIFEST, json.loads)
    problem = problem or manifest_problem(manifest, d / MANIFEST)
    if problem:
        return problem
    world = (state or {}).get("world_size", 0)
    for name in [*manifest["files"], *(f"rng_rank{r}.pt" for r in range(world))]:
        if not (d / name).is_file():
            return f"{d / name} is missing"
    for name, size in manifest["files"].items():
        actual = (d / name).stat().st_size
        if actual != size:
            return f"{d / name} is {actual} bytes but {d / MANIFEST} records {size}: truncated or overwritten"
    return _pieces_problem(d, manifest)


def _pieces_problem(d: Path, manifest: dict) -> Optional[str]:
    """None when every piece the manifest names is in its file with its dtype and element count."""
    stored = {}
    for name in manifest["files"]:
        with open(d / name, "rb") as f:
            try:
                stored[name] = stio.read_header(f)[0]
            except stio.HeaderError as e:
                return str(e)
    for kind, entries in manifest["tensors"].items():
        for tensor, e in entries.items():
            for pc in e["pieces"]:
                v = stored[pc["file"]].get(pc["key"])
                if v is None or v["dtype"] != e["dtype"] or math.prod(v["shape"]) != pc["numel"]:
                    return (f"{d / pc['file']} holds no {e['dtype']} tensor {pc['key']} of {pc['numel']} elements, "
                            f"which {d / MANIFEST} names for {kind}/{tensor}: the files do not belong together")
    return None


def _expected_files(d: Path, state: Optional[dict]) -> list[str]:
    """Files a complete unsharded checkpoint has: weights (one per pipeline stage); for a training
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
    with open(path, "rb") as f:
        try:
            header, data_start = stio.read_header(f)
        except stio.HeaderError as e:
            return str(e)
    size, end = path.stat().st_size, data_start + stio.data_end(header)
    if end != size:
        return f"{path} is {size} bytes but its header describes {end}: truncated or overwritten"
    return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` as a safetensors file, one tensor at a time from its own memory; its size."""
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return stio.write_tensors(path, specs, tensors.values())


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
    save_tokenizer(tokenizer, tmp)  # every file above is fsynced by its writer
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

        for name in copy_tokenizer(tokenizer, ckpt_dir):  # durable before the directory is renamed
            with open(ckpt_dir / name, "rb") as fh:
                os.fsync(fh.fileno())


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


def expected_model(cfg: Config) -> dict[str, torch.Tensor]:
    """The state_dict a model of ``cfg`` has, as meta tensors (names and shapes, no memory)."""
    from megasink.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model, cfg.aux_loss).state_dict()


def load_full_model(path: str | os.PathLike, map_location: str = "cpu"):
    """(model, cfg) on one device from any checkpoint (run dir, checkpoints dir or step dir), read
    one tensor at a time into the model."""
    from megasink.model.transformer import Transformer

    ckpt = resolve_checkpoint_dir(path)
    cfg = load_config(ckpt / "config.yaml")
    model = Transformer(cfg.model, cfg.aux_loss)
    read_model_into(model, ckpt)
    return model.to(map_location), cfg


def read_model_into(model: torch.nn.Module, ckpt: Path, ignore: tuple = ()) -> None:
    """Copy checkpoint ``ckpt``'s model tensors into ``model`` (same architecture: checked by name and
    shape first, CheckpointError otherwise), one tensor at a time: the whole state is never held
    beside the model. ``ignore``: names left as the model has them."""
    own = model.state_dict()  # shares the parameters' storage
    with CheckpointReader(ckpt) as reader, torch.no_grad():
        reader.check_model(own, model.cfg.tie_embeddings, ignore)
        for name in reader.names():
            if name not in ignore:
                own[name].copy_(reader.read_full(name))
