"""The sharded checkpoint's manifest, and reading checkpoint tensors, whole or in the part one
rank needs, from either format.

The formats are described in ``megasink/checkpoint.py``. Everything here reads through a
manifest: the sharded format's ``manifest.json``, or one built from an unsharded checkpoint's
safetensors headers (one piece per tensor, not split). A rank that holds TP part ``part`` of
``parts`` along ``dim`` asks for a flat range of that part; ``_runs`` maps it onto the pieces
that hold it (any source split, any target split, along the same dimension) and only those
bytes are read (``megasink.safetensors_io.read_range``). Whole tensors are read one at a time.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from megasink import safetensors_io as stio
from megasink.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megasink-sharded"
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: the message names the directory or file and what to do."""


def is_sharded(step_dir: Path) -> bool:
    """True for the sharded format (a manifest, or the per-rank files a sharded save writes first)."""
    d = Path(step_dir)
    return (d / MANIFEST).exists() or any(d.glob("*-rank*-of-*.safetensors"))


def parsed(path: Path, parse) -> tuple[Optional[dict], Optional[str]]:
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


# --------------------------------------------------------------------------- the manifest


def build_manifest(reports: list[dict], step: int, layout: dict) -> dict:
    """The manifest of a sharded save from every rank's report: ``{"files": {name: bytes},
    "pieces": [piece, ...]}``, a piece ``{"kind", "name", "dtype", "part_shape", "dim", "parts",
    "part", "start", "numel", "file", "key"}`` (``dim`` None: not split, one part). Raises
    RuntimeError when the pieces do not tile every tensor (a bug in the writer)."""
    tensors: dict = {}
    files: dict = {}
    for rep in reports:
        files.update(rep["files"])
        for pc in rep["pieces"]:
            e = tensors.setdefault(pc["kind"], {}).setdefault(pc["name"], {
                "dtype": pc["dtype"], "part_shape": pc["part_shape"], "dim": pc["dim"],
                "sizes": [None] * pc["parts"], "pieces": []})
            if pc["dim"] is not None:
                e["sizes"][pc["part"]] = pc["part_shape"][pc["dim"]]
            e["pieces"].append({k: pc[k] for k in ("file", "key", "part", "start", "numel")})
    for kind, entries in tensors.items():
        for name, e in entries.items():
            shape, dim, sizes = list(e.pop("part_shape")), e.pop("dim"), e.pop("sizes")
            if dim is not None:
                if None in sizes:
                    raise RuntimeError(f"sharded save: no rank wrote TP part {sizes.index(None)} of {kind}/{name}")
                shape[dim] = sum(sizes)
            e["shape"], e["split"] = shape, (None if dim is None else {"dim": dim, "sizes": sizes})
            e["pieces"].sort(key=lambda pc: (pc["part"], pc["start"]))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "layout": layout, "files": files,
                "tensors": tensors}
    problem = manifest_problem(manifest, MANIFEST)
    if problem:
        raise RuntimeError(f"sharded save wrote an incomplete checkpoint: {problem}")
    return manifest


def manifest_problem(manifest: dict, where) -> Optional[str]:
    """None when ``manifest`` is a sharded-checkpoint manifest whose pieces tile every tensor."""
    try:
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != 1:
            return f"{where} is not a {MANIFEST_FORMAT} version 1 manifest"
        files = manifest["files"]
        for kind, entries in manifest["tensors"].items():
            for name, e in entries.items():
                problem = _tiling_problem(e, files)
                if problem:
                    return f"{where}: {kind}/{name}: {problem}"
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        return f"{where} does not hold a valid manifest ({type(e).__name__}: {e})"
    return None


def _tiling_problem(e: dict, files: dict) -> Optional[str]:
    """None when the pieces of manifest entry ``e`` cover each TP part exactly once."""
    split, numel = e["split"], math.prod(e["shape"])
    sizes = split["sizes"] if split else [1]
    extent = e["shape"][split["dim"]] if split else 1
    if e["dtype"] not in stio.TORCH_DTYPES:
        return f"dtype {e['dtype']!r} is none of {', '.join(stio.TORCH_DTYPES)}"
    if sum(sizes) != extent:
        return f"split sizes {sizes} do not add up to {extent}"
    by_part: dict = {}
    for pc in e["pieces"]:
        if pc["file"] not in files:
            return f"a piece names {pc['file']}, which the manifest's files do not list"
        if not 0 <= int(pc["part"]) < len(sizes):
            return f"a piece names part {pc['part']} of {len(sizes)}"
        by_part.setdefault(int(pc["part"]), []).append((int(pc["start"]), int(pc["numel"])))
    for part, size in enumerate(sizes):
        pos, want = 0, (numel // extent * size if extent else 0)
        for start, n in sorted(by_part.get(part, [])):
            if start != pos:
                return f"part {part}: elements from {min(pos, start)} to {max(pos, start)} are " + (
                    "in no piece" if start > pos else "in two pieces")
            pos += n
        if pos != want:
            return f"part {part}: the pieces hold {pos} of its {want} elements"
    return None


def load_manifest(step_dir: Path) -> dict:
    """The manifest of a checkpoint; for the unsharded format one built from its files' headers
    (one piece per tensor, not split)."""
    d = Path(step_dir)
    if is_sharded(d):
        manifest, problem = parsed(d / MANIFEST, json.loads)
        problem = problem or manifest_problem(manifest, d / MANIFEST)
        if problem:
            raise CheckpointError(f"checkpoint {d} is damaged: {problem}")
        return manifest
    tensors: dict = {}
    files = sorted(d.glob("model*.safetensors")) + sorted(d.glob("optim*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            try:
                header, _ = stio.read_header(f)
            except stio.HeaderError as e:
                raise CheckpointError(f"checkpoint {d} is damaged: {e}") from None
        for key, v in header.items():
            kind, name = key.split("/", 1) if path.name.startswith("optim") else ("model", key)
            piece = {"file": path.name, "key": key, "part": 0, "start": 0, "numel": math.prod(v["shape"])}
            tensors.setdefault(kind, {})[name] = {"shape": v["shape"], "dtype": v["dtype"], "split": None,
                                                  "pieces": [piece]}
    return {"format": "unsharded", "files": {p.name: p.stat().st_size for p in files}, "tensors": tensors}


# --------------------------------------------------------------------------- reading


def chunk_bounds(extent: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of ``parts`` pieces of ``extent`` as torch.chunk cuts them (how tensor
    parallelism splits a parameter along its ``tp_shard_dim``)."""
    c = -(-extent // parts) if parts else 0
    return [(min(j * c, extent), min((j + 1) * c, extent)) for j in range(parts)]


def _runs(outer: int, inner: int, src: list[tuple[int, int]], t0: int, t1: int, lo: int, hi: int):
    """Yield (source part, element offset in it, offset in the output, count) covering elements
    [lo, hi) of the target part: the full tensor's slice [t0, t1) along the split dimension, seen
    as (outer, t1 - t0, inner); ``src`` are the source parts' slices along that dimension. Runs
    contiguous on both sides are merged, so equal layouts read one range."""
    width = t1 - t0
    if hi <= lo or width <= 0 or inner <= 0:
        return
    u0, u1 = lo // inner, -(-hi // inner)  # rows of `inner` elements that [lo, hi) touches
    run = None
    for p in range(u0 // width, (u1 - 1) // width + 1):
        x0, x1 = t0 + max(u0 - p * width, 0), t0 + min(u1 - p * width, width)
        for j, (b0, b1) in enumerate(src):
            y0, y1 = max(x0, b0), min(x1, b1)
            if y0 >= y1:
                continue
            ta, tb = (p * width + y0 - t0) * inner, (p * width + y1 - t0) * inner
            a, b = max(ta, lo), min(tb, hi)
            if a >= b:
                continue
            s = (p * (b1 - b0) + y0 - b0) * inner + a - ta
            if run and run[0] == j and run[1] + run[3] == s and run[2] + run[3] == a - lo:
                run[3] += b - a
            else:
                if run:
                    yield tuple(run)
                run = [j, s, a - lo, b - a]
    if run:
        yield tuple(run)


class _Entry:
    """One tensor of a manifest, indexed for reads."""

    def __init__(self, e: dict):
        self.shape, self.dtype = tuple(e["shape"]), stio.TORCH_DTYPES[e["dtype"]]
        split = e["split"]
        self.dim = None if split is None else int(split["dim"])
        sizes = [1] if split is None else split["sizes"]
        edges = [0]
        for n in sizes:
            edges.append(edges[-1] + n)
        self.bounds = list(zip(edges[:-1], edges[1:]))
        self.parts: dict = {}
        for pc in e["pieces"]:
            self.parts.setdefault(int(pc["part"]), []).append(pc)
        for part in self.parts.values():
            part.sort(key=lambda pc: pc["start"])
        self.starts = {j: [pc["start"] for pc in ps] for j, ps in self.parts.items()}


class CheckpointReader:
    """A checkpoint's tensors, whole or the part a rank needs, whatever layout wrote them.

    ``split = (dim, parts, part)`` names a tensor-parallel part (``torch.chunk`` of the full
    tensor along ``dim``); ``read(name, kind, split, lo, hi)`` returns elements [lo, hi) of that
    part flattened, reading only the bytes of the pieces that hold them. Files stay open until
    ``close`` (or the end of a ``with`` block)."""

    def __init__(self, step_dir: str | os.PathLike):
        self.dir = Path(step_dir)
        self.manifest = load_manifest(self.dir)
        self._entries: dict = {}
        self._files: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f, _, _ in self._files.values():
            f.close()
        self._files.clear()

    @property
    def sharded(self) -> bool:
        return self.manifest["format"] == MANIFEST_FORMAT

    def names(self, kind: str = "model") -> list[str]:
        return list(self.manifest["tensors"].get(kind, {}))

    def has(self, name: str, kind: str = "model") -> bool:
        return name in self.manifest["tensors"].get(kind, {})

    def shape(self, name: str, kind: str = "model", split: Optional[tuple] = None) -> tuple:
        """The full shape of a tensor, or of its TP part ``split``."""
        shape = list(self._entry(name, kind).shape)
        if split is not None and split[0] is not None:
            dim, parts, part = split
            b0, b1 = chunk_bounds(shape[dim], parts)[part]
            shape[dim] = b1 - b0
        return tuple(shape)

    def _entry(self, name: str, kind: str) -> _Entry:
        if (kind, name) not in self._entries:
            if not self.has(name, kind):
                raise CheckpointError(f"{self.dir}: the checkpoint has no {kind} tensor {name!r}")
            self._entries[kind, name] = _Entry(self.manifest["tensors"][kind][name])
        return self._entries[kind, name]

    def read(self, name: str, kind: str = "model", split: Optional[tuple] = None, lo: int = 0,
             hi: Optional[int] = None) -> torch.Tensor:
        """Elements [lo, hi) of TP part ``split`` (None: the whole tensor) of ``kind/name``, 1-D."""
        e = self._entry(name, kind)
        dim = e.dim if split is None or split[0] is None else split[0]
        if e.dim is not None and dim != e.dim:
            raise CheckpointError(f"{self.dir}: {kind}/{name} is split along dim {e.dim}, not {dim}: "
                                  "the checkpoint holds another model")
        full = e.shape
        extent = 1 if dim is None else full[dim]
        outer = 1 if dim is None else math.prod(full[:dim])
        inner = math.prod(full) if dim is None else math.prod(full[dim + 1:])
        t0, t1 = (0, extent) if split is None or split[0] is None else chunk_bounds(extent, split[1])[split[2]]
        n = outer * (t1 - t0) * inner
        hi = n if hi is None else hi
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"{kind}/{name}: elements [{lo}, {hi}) of a part of {n}")
        src = e.bounds if e.dim is not None else [(0, extent)]
        out = torch.empty(hi - lo, dtype=e.dtype)
        for j, s, o, count in _runs(outer, inner, src, t0, t1, lo, hi):
            self._copy(e, kind, name, j, s, out[o:o + count])
        return out

    def read_full(self, name: str, kind: str = "model") -> torch.Tensor:
        return self.read(name, kind).view(self._entry(name, kind).shape)

    def tensors(self, kind: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one at a time."""
        for name in self.names(kind):
            yield name, self.read_full(name, kind)

    def _copy(self, e: _Entry, kind: str, name: str, part: int, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of TP part ``part`` into ``out``, from its pieces."""
        pieces, starts = e.parts.get(part, []), e.starts.get(part, [])
        pos, end = start, start + out.numel()
        i = bisect.bisect_right(starts, pos) - 1
        while pos < end:
            if i < 0 or i >= len(pieces) or pos >= starts[i] + pieces[i]["numel"]:
                raise CheckpointError(f"{self.dir}: no piece of {kind}/{name} (part {part}) holds element {pos}: "
                                      f"{MANIFEST} is damaged")
            pc = pieces[i]
            stop = min(end, starts[i] + pc["numel"])
            f, header, data_start = self._file(pc["file"])
            stored = header.get(pc["key"])
            if (stored is None or stio.TORCH_DTYPES[stored["dtype"]] != e.dtype
                    or math.prod(stored["shape"]) < stop - starts[i]):
                raise CheckpointError(f"{self.dir / pc['file']}: holds no {stio.DTYPES[e.dtype]} tensor {pc['key']} of "
                                      f"{pc['numel']} elements, which the manifest names: the checkpoint is damaged")
            stio.read_range(f, stored, data_start, pos - starts[i], out[pos - start:stop - start])
            pos, i = stop, i + 1

    def _file(self, name: str):
        if name not in self._files:
            f = stio.open_unbuffered(self.dir / name)
            try:
                header, data_start = stio.read_header(f)
            except stio.HeaderError as e:
                f.close()
                raise CheckpointError(f"checkpoint {self.dir} is damaged: {e}") from None
            self._files[name] = (f, header, data_start)
        return self._files[name]

    def model_tensors(self) -> "LazyTensors":
        return LazyTensors(self)

    def check_model(self, expected: Mapping, tied: bool, ignore: tuple = ()) -> None:
        """Raise CheckpointError unless the model tensors have exactly the names and shapes of
        ``expected`` (a state_dict; meta tensors will do); a tied output.weight may be absent;
        names in ``ignore`` are not compared."""
        names = set(self.names()) - set(ignore)
        expected = {k: v for k, v in expected.items() if k not in ignore}
        allowed = {"output.weight"} if tied else set()
        missing = [k for k in expected if k not in names and k not in allowed]
        unexpected = sorted(names - set(expected))
        shapes = [f"{k}: {self.shape(k)} vs model {tuple(v.shape)}" for k, v in expected.items()
                  if k in names and self.shape(k) != tuple(v.shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{self.dir}: checkpoint does not match its config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, shapes {shapes[:5]}")


class LazyTensors(Mapping):
    """A checkpoint's model tensors as a read-only mapping: each lookup reads that one full tensor."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self.reader.has(name):
            raise KeyError(name)
        return self.reader.read_full(name)

    def __contains__(self, name) -> bool:
        return self.reader.has(name)

    def __iter__(self):
        return iter(self.reader.names())

    def __len__(self) -> int:
        return len(self.reader.names())

    def meta(self) -> dict[str, torch.Tensor]:
        """The same names as shape-only (meta) tensors: nothing is read."""
        e = self.reader._entry
        return {k: torch.empty(e(k, "model").shape, dtype=e(k, "model").dtype, device="meta") for k in self}


def load_model_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All model tensors of a checkpoint (either format), whole."""
    with CheckpointReader(ckpt_dir) as r:
        return dict(r.tensors("model"))


def load_optim_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All AdamW moments of a checkpoint (either format), whole, keyed "exp_avg/<name>", "exp_avg_sq/<name>"."""
    with CheckpointReader(ckpt_dir) as r:
        return {f"{kind}/{name}": t for kind in MOMENTS for name, t in r.tensors(kind)}
