"""Input corpora for the tokenizer trainer and the preprocessor.

Accepted inputs (each a file, a directory searched recursively, or a glob):

- parquet shards as FineWeb-Edu publishes them (``text``, ``id``, ``url``, ``score``,
  ``int_score``, ...);
- JSON lines, plain (``.jsonl``, ``.json``, ``.ndjson``) or compressed (``.gz``, ``.zst``);
- a ``datasets`` dataset written with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``,
  of which one split is read).

Reading yields :class:`Chunk` objects: up to ``chunk_docs`` raw records, in a
deterministic order (inputs as given, directory and glob matches sorted). Text stays raw
(``bytes`` for parquet/arrow, whole JSON lines for JSONL) so that decoding, validation and
tokenization happen in the worker processes.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from megasink.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
PARQUET_SUFFIXES = (".parquet",)


class InputError(UserError, ValueError):
    """An input that cannot be read as asked (names the file and what to do)."""


@dataclass
class Source:
    """One input: ``kind`` is parquet | jsonl | arrow (a ``datasets`` save_to_disk folder)."""

    path: str
    kind: str


@dataclass
class Chunk:
    """Up to ``chunk_docs`` consecutive records of one source.

    ``records``: for parquet/arrow, text values (bytes or None); for jsonl, raw lines.
    ``int_scores`` / ``scores``: per record, only for parquet/arrow when a filter needs them.
    Parquet/arrow chunks come out of ``iter_chunks`` as Arrow arrays, which travel to worker
    processes as a few buffers (one copy, no per-document objects in the reading process);
    call ``as_lists()`` before indexing records.
    """

    source: int
    kind: str
    records: list
    int_scores: Optional[list] = None
    scores: Optional[list] = None

    def as_lists(self) -> "Chunk":
        """The same chunk with Python lists (bytes / None, numbers / None) in every field."""
        to_list = lambda xs: xs.to_pylist() if hasattr(xs, "to_pylist") else xs  # noqa: E731
        return Chunk(self.source, self.kind, to_list(self.records), to_list(self.int_scores), to_list(self.scores))


@dataclass
class ReadOptions:
    """What to read: the text column and the columns the filters need."""

    text_key: str = "text"
    need_int_score: bool = False
    need_score: bool = False
    split: str = "train"
    chunk_docs: int = 256

    def required(self) -> list:
        """Columns every input must have."""
        cols = [self.text_key]
        if self.need_int_score:
            cols.append("int_score")
        if self.need_score:
            cols.append("score")
        return cols


def _is_supported_file(name: str) -> Optional[str]:
    low = name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if low.endswith(comp):
            low = low[: -len(comp)]
            break
    else:
        if low.endswith(PARQUET_SUFFIXES):
            return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _is_saved_dataset(path: str) -> bool:
    """A ``save_to_disk`` folder: ``state.json`` (Dataset) or ``dataset_dict.json`` (DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _walk_dir(path: str) -> list[Source]:
    if _is_saved_dataset(path):
        return [Source(path, "arrow")]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            kind = _is_supported_file(name)
            if kind and not name.startswith("."):
                found.append(Source(os.path.join(root, name), kind))
    if not found:
        raise InputError(
            f"input directory {path} holds no .parquet / .jsonl / .json(.gz|.zst) files and is not a "
            "datasets save_to_disk folder"
        )
    return found


def expand_inputs(paths: list[str]) -> list[Source]:
    """Resolve files, directories and globs to an ordered, de-duplicated list of sources."""
    if not paths:
        raise InputError("no input given (--input PATHS...)")
    sources: list[Source] = []
    for raw in paths:
        if any(c in raw for c in "*?[") and not os.path.exists(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input glob {raw!r} matches no file")
        else:
            matches = [raw]
        for path in matches:
            if os.path.isdir(path):
                sources.extend(_walk_dir(path))
            elif os.path.isfile(path):
                kind = _is_supported_file(path)
                if kind is None:
                    raise InputError(
                        f"input {path}: unsupported file type (use .parquet, .jsonl/.json/.ndjson, "
                        "optionally .gz or .zst, or a datasets save_to_disk folder)"
                    )
                sources.append(Source(path, kind))
            else:
                raise FileNotFoundError(f"input {path} does not exist")
    seen, unique = set(), []
    for s in sources:
        key = os.path.realpath(s.path)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def _missing_columns_error(source: Source, missing: list, existing: list) -> InputError:
    hint = " (use --text-key NAME)" if missing and missing[0] else ""
    return InputError(
        f"input {source.path}: no column {', '.join(repr(m) for m in missing)}; "
        f"the columns are: {', '.join(existing)}{hint}"
    )


def check_source(source: Source, opts: ReadOptions) -> Optional[int]:
    """Validate one source before any work: readable, and has the needed columns.

    Returns the number of records when cheaply known (parquet metadata), else None.
    """
    if source.kind == "parquet":
        pf = _open_parquet(source.path)
        names = pf.schema_arrow.names
        missing = [c for c in opts.required() if c not in names]
        if missing:
            raise _missing_columns_error(source, missing, names)
        return pf.metadata.num_rows
    if source.kind == "arrow":
        ds = _load_saved_dataset(source.path, opts.split)
        missing = [c for c in opts.required() if c not in ds.column_names]
        if missing:
            raise _missing_columns_error(source, missing, ds.column_names)
        return len(ds)
    first = _first_jsonl_record(source.path)
    if first is not None:
        missing = [c for c in opts.required() if c not in first]
        if missing:
            raise _missing_columns_error(source, missing, list(first))
    return None


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated files
        raise InputError(f"input {path} is not a readable parquet file (truncated or corrupt?): {e}") from e


def _load_saved_dataset(path: str, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise InputError(f"input {path}: cannot load it as a datasets save_to_disk folder: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"input {path}: DatasetDict has no split {split!r} (splits: {', '.join(ds)}); use --split")
        ds = ds[split]
    return ds


def open_text_stream(path: str) -> io.BufferedIOBase:
    """Binary stream of a (possibly .gz / .zst compressed) file."""
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _first_jsonl_record(path: str) -> Optional[dict]:
    """The first line of a JSONL file that parses as a JSON object (None for an empty file).

    Lines before it (invalid UTF-8, malformed JSON) are the workers' counted skips, as
    anywhere else in the file; a file where no line parses is not JSONL and is refused."""
    lines = 0
    try:
        with open_text_stream(path) as f:
            for line in f:
                if not line.strip():
                    continue
                if lines == 0 and line.lstrip().startswith(b"["):
                    raise InputError(f"input {path}: looks like a JSON array; convert it to JSON lines "
                                     "(one object per line)")
                lines += 1
                record = _json_object(line)
                if record is not None:
                    return record
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"input {path}: cannot read it ({type(e).__name__}: {e})") from e
    if lines:
        raise InputError(f"input {path} is not JSONL: none of its {lines} non-empty lines is a JSON object "
                         "(one object per line, UTF-8)")
    return None


def _json_object(line: bytes) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    return record if isinstance(record, dict) else None


def iter_chunks(sources: list[Source], opts: ReadOptions, max_docs: int = 0) -> Iterator[Chunk]:
    """All records of all sources, in order, as chunks; stops after ``max_docs`` (0: all)."""
    remaining = max_docs if max_docs > 0 else None
    for i, source in enumerate(sources):
        if source.kind == "jsonl":
            chunks = _jsonl_chunks(i, source, opts)
        else:
            chunks = _arrow_chunks(i, source, opts)
        for chunk in chunks:
            if remaining is not None:
                if remaining <= 0:
                    return
                if len(chunk.records) > remaining:
                    chunk = _truncate(chunk, remaining)
                remaining -= len(chunk.records)
            yield chunk


def _truncate(chunk: Chunk, n: int) -> Chunk:
    cut = lambda xs: None if xs is None else (_compact(xs[:n]) if hasattr(xs, "to_pylist") else xs[:n])  # noqa: E731
    return Chunk(chunk.source, chunk.kind, cut(chunk.records), cut(chunk.int_scores), cut(chunk.scores))


def _jsonl_chunks(index: int, source: Source, opts: ReadOptions) -> Iterator[Chunk]:
    lines: list[bytes] = []
    try:
        with open_text_stream(source.path) as f:
            for line in f:
                if not line.strip():
                    continue
                lines.append(line)
                if len(lines) >= opts.chunk_docs:
                    yield Chunk(index, "jsonl", lines)
                    lines = []
    except (EOFError, OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"input {source.path}: read failed ({type(e).__name__}: {e}); truncated or corrupt?") from e
    if lines:
        yield Chunk(index, "jsonl", lines)


def _arrow_batches(source: Source, opts: ReadOptions, columns: list):
    if source.kind == "parquet":
        pf = _open_parquet(source.path)
        return pf.iter_batches(batch_size=opts.chunk_docs, columns=columns)
    ds = _load_saved_dataset(source.path, opts.split).select_columns(columns).with_format("arrow")
    return ds.iter(batch_size=opts.chunk_docs)


def _arrow_chunks(index: int, source: Source, opts: ReadOptions) -> Iterator[Chunk]:
    import pyarrow as pa

    columns = opts.required()
    batches = _arrow_batches(source, opts, columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a corrupt page inside an otherwise readable file
            raise InputError(f"input {source.path}: read failed ({type(e).__name__}: {e}); truncated or corrupt?") from e
        text = batch.column(opts.text_key)
        if pa.types.is_string(text.type):
            text = text.cast(pa.binary())  # zero-copy; UTF-8 is validated in the worker
        elif pa.types.is_large_string(text.type):
            text = text.cast(pa.large_binary())
        int_scores = _compact(batch.column("int_score")) if opts.need_int_score else None
        scores = _compact(batch.column("score")) if opts.need_score else None
        yield Chunk(index, source.kind, _compact(text), int_scores, scores)


def _compact(values):
    """An Arrow array holding just its own rows: a slice (a ``datasets`` batch of a larger record
    batch, or a truncated chunk) would otherwise pickle its parent's whole buffers."""
    import pyarrow as pa

    parts = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return pa.concat_arrays(parts) if parts else pa.array([], type=values.type)
