"""Tokenize a corpus into Megatron indexed datasets (the library behind tools/preprocess_data.py).

Pipeline: the main process reads raw records in chunks (:mod:`megasink.data.sources`) and
hands them to ``workers`` processes, which decode and validate the text, apply the
filters, encode a chunk's texts in one batch with the tokenizer (sentencepiece or Hugging
Face, :mod:`megasink.data.tokenizer`), frame each document (BOS as the tokenizer does, EOS)
and assign it to the train or validation split; the main process writes the results in
input order, so the output is the same bytes for any number of workers. Each worker encodes
in one thread (a Hugging Face tokenizer's own thread pool is turned off there): ``workers``
is the parallelism.

Tokens are stored as uint16 when every id fits (vocab_size <= 65536), else int32; the
``.idx`` header records the dtype with Megatron's code, so Megatron's readers read either.

Outputs for ``--output-prefix P``: ``P.bin/.idx`` (or shards ``P_00000.*``, ...),
``P_valid.bin/.idx`` when ``valid_fraction > 0``, and ``P.meta.json``. Everything is
written under temporary names and renamed at the end, ``P.meta.json`` last.

Validation split: a document goes to validation when a hash of its UTF-8 text falls
below ``valid_fraction``: independent of input order, filters and workers, and exact
duplicates always land on the same side.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Iterator, Optional

import numpy as np

from megasink.data.indexed import token_dtype
from megasink.errors import DataError
from megasink.data.outputs import (
    OutputExistsError,  # noqa: F401  (re-exported: raised by preprocess())
    ShardedWriter,
    check_output_prefix,
    commit_outputs,
    new_parent_dirs,
    remove_empty_dirs,
    valid_prefix,
)
from megasink.data.records import SKIP_REASONS, RecordFilter, keep_text, record_fields
from megasink.data.sft import FORMATS, RecordError, RecordFormat, parse_record, prompt_response_documents
from megasink.data.sources import Chunk, InputError, ReadOptions, check_source, expand_inputs, iter_chunks


@dataclass
class PreprocessConfig:
    """Options of one preprocessing run (all of them are recorded in ``P.meta.json``)."""

    inputs: list
    """Files, directories or globs (parquet, jsonl[.gz|.zst], datasets save_to_disk folders)."""
    tokenizer: str
    """sentencepiece ``.model`` file or Hugging Face tokenizer directory (``tokenizer.json``)."""
    output_prefix: str
    """Output prefix P (writes P.bin/P.idx or P_00000.*, P_valid.*, P.meta.json)."""
    text_key: str = "text"
    """Column / JSON key holding the document text."""
    workers: int = 1
    """Tokenizer processes; 0 tokenizes in the main process (no multiprocessing)."""
    valid_fraction: float = 0.0
    """Fraction of documents held out for validation (by text hash)."""
    shard_size: int = 0
    """Tokens per training shard (a shard closes after the document that reaches it); 0: one file."""
    min_int_score: Optional[int] = None
    """Keep documents with int_score >= this (FineWeb-Edu's educational threshold is 3)."""
    min_score: Optional[float] = None
    """Keep documents with score >= this."""
    min_chars: int = 0
    """Skip documents shorter than this many characters."""
    min_tokens: int = 0
    """Skip documents with fewer tokens than this (EOS not counted)."""
    max_docs: int = 0
    """Read at most this many input records (0: all)."""
    split: str = "train"
    """Split to read from a datasets DatasetDict folder."""
    format: str = "text"
    """Records: text | prompt_response | chat (JSON lines; the last two write a loss mask beside the
    tokens, megasink/data/sft.py)."""
    prompt_key: str = "prompt"
    """prompt_response: the JSON key of the prompt."""
    response_key: str = "response"
    """prompt_response: the JSON key of the response."""
    messages_key: str = "messages"
    """chat: the JSON key of the list of {"role", "content"} messages."""
    append_eos: bool = True
    """Append the tokenizer's EOS id to every document."""
    prepend_bos: Optional[bool] = None
    """Prepend the tokenizer's BOS id: None as the tokenizer's own encode does (Llama 3 yes, sentencepiece no)."""
    overwrite: bool = False
    """Replace existing outputs at the prefix."""
    chunk_docs: int = 256
    """Records per work item sent to a worker."""
    progress: bool = True
    """Show a progress bar (docs/s, tokens/s) on stderr when stderr is a terminal."""


@dataclass
class SplitStats:
    """Documents, tokens (BOS/EOS included) and UTF-8 bytes written to one split."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass
class PreprocessResult:
    """Counts of one run plus its wall time (the time is not written to meta.json)."""

    read: int = 0
    train: SplitStats = field(default_factory=SplitStats)
    valid: SplitStats = field(default_factory=SplitStats)
    skipped: Counter = field(default_factory=Counter)
    outputs: list = field(default_factory=list)
    seconds: float = 0.0
    worker_seconds: float = 0.0
    """Summed time the workers spent on chunks: close to workers x seconds when reading keeps up."""

    @property
    def tokens(self) -> int:
        """Tokens written to both splits."""
        return self.train.tokens + self.valid.tokens


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


@dataclass(frozen=True)
class _WorkerOptions:
    filter: RecordFilter
    dtype: str
    min_tokens: int
    valid_fraction: float
    eos_id: int  # -1: do not append
    bos_id: int  # -1: do not prepend
    record_format: RecordFormat = RecordFormat()


@dataclass
class ChunkResult:
    """Documents kept from one chunk: flat tokens, per-document lengths / bytes / split."""

    tokens: np.ndarray  # (sum(lengths),) token dtype
    lengths: np.ndarray  # (n_kept,) int64, EOS/BOS included
    nbytes: np.ndarray  # (n_kept,) int64, UTF-8 bytes of the text
    is_valid: np.ndarray  # (n_kept,) bool
    read: int
    skipped: Counter
    busy_seconds: float = 0.0  # worker wall time spent in process_chunk
    loss_mask: Optional[np.ndarray] = None  # (sum(lengths),) uint8 for prompt_response / chat


def _init_worker(spec: tuple, opts: _WorkerOptions, in_pool: bool = True) -> None:
    """Load the tokenizer's encoder (``Tokenizer.worker_spec``: a path, never the tokenizer itself)."""
    from megasink.data.tokenizer import open_worker_encoder

    if in_pool:  # one thread per worker: --workers is the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encode"] = open_worker_encoder(spec)
    _WORKER["opts"] = opts
    if opts is not None and opts.record_format.kind == "chat":  # the template renders messages: transformers here
        from megasink.data.sft import ChatRenderer

        _WORKER["chat"] = ChatRenderer(opts.record_format.tokenizer, opts.eos_id if opts.eos_id >= 0 else None)


def is_valid_document(raw: bytes, valid_fraction: float) -> bool:
    """Validation-split membership of a document from a hash of its UTF-8 bytes."""
    if valid_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return h < valid_fraction * 2.0**64


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Decode, validate, filter, encode and frame one chunk (runs in a worker process)."""
    start = time.perf_counter()
    chunk = chunk.as_lists()
    opts = _WORKER["opts"]
    if opts.record_format.masked:
        return _masked_chunk(chunk, opts, start)
    skipped: Counter = Counter()
    texts, raws = [], []
    for i in range(len(chunk.records)):
        fields = record_fields(chunk, i, opts.filter.text_key, skipped)
        raw = None if fields is None else keep_text(*fields, opts.filter, skipped)
        if raw is not None:
            texts.append(fields[0])
            raws.append(raw)
    bos, eos = [opts.bos_id] if opts.bos_id >= 0 else [], [opts.eos_id] if opts.eos_id >= 0 else []
    parts, lengths, nbytes, valid = [], [], [], []
    for raw, ids in zip(raws, _WORKER["encode"](texts) if texts else []):
        if len(ids) < max(opts.min_tokens, 1):
            skipped["too_few_tokens"] += 1
            continue
        parts += (bos, ids, eos)
        lengths.append(len(bos) + len(ids) + len(eos))
        nbytes.append(len(raw))
        valid.append(is_valid_document(raw, opts.valid_fraction))
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.fromiter(chain.from_iterable(parts), dtype=opts.dtype, count=int(lengths.sum()))
    return ChunkResult(
        tokens, lengths, np.asarray(nbytes, dtype=np.int64), np.asarray(valid, dtype=bool), len(chunk.records), skipped,
        time.perf_counter() - start,
    )


def _masked_chunk(chunk: Chunk, opts: _WorkerOptions, start: float) -> ChunkResult:
    """process_chunk for prompt_response / chat records: documents and their loss masks."""
    fmt, skipped = opts.record_format, Counter()
    items, raws = [], []
    for line in chunk.records:
        try:
            items.append(parse_record(line, fmt))
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        except RecordError:
            skipped["invalid_record"] += 1
            continue
        except ValueError:
            skipped["invalid_json"] += 1
            continue
        raws.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    if fmt.kind == "prompt_response":
        bos, eos = (x if x >= 0 else None for x in (opts.bos_id, opts.eos_id))
        docs = prompt_response_documents(items, _WORKER["encode"], bos, eos) if items else []
    else:
        docs = [_render_chat(messages) for messages in items]
    parts, masks, lengths, nbytes, valid = [], [], [], [], []
    for raw, item, (ids, mask) in zip(raws, items, docs):
        if len(ids) < max(opts.min_tokens, 1):
            skipped["too_few_tokens"] += 1
            continue
        parts.append(ids)
        masks.append(mask)
        lengths.append(len(ids))
        text = item if fmt.kind == "prompt_response" else [m["content"] for m in item]
        nbytes.append(sum(len(t.encode("utf-8")) for t in text))
        valid.append(is_valid_document(raw, opts.valid_fraction))
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    return ChunkResult(
        np.fromiter(chain.from_iterable(parts), dtype=opts.dtype, count=n), lengths,
        np.asarray(nbytes, dtype=np.int64), np.asarray(valid, dtype=bool), len(chunk.records), skipped,
        time.perf_counter() - start, np.fromiter(chain.from_iterable(masks), dtype=np.uint8, count=n),
    )


def _render_chat(messages: list) -> tuple[list[int], list[int]]:
    try:
        return _WORKER["chat"](messages)
    except RecordError as e:  # the template's, not the record's: every record would fail
        first = " ".join(messages[0]["content"].split())[:60]
        raise DataError(f"chat record starting {first!r}: {e}") from e


def _run_chunks(chunks: Iterator[Chunk], workers: int, init_args: tuple) -> Iterator[ChunkResult]:
    """Results of ``process_chunk`` in input order, with a bounded number of chunks in flight."""
    if workers <= 0:
        _init_worker(*init_args, in_pool=False)
        for chunk in chunks:
            yield process_chunk(chunk)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")  # safe when the caller already started threads (torch)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args)
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(process_chunk, chunk))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:  # a worker was killed (out of memory?) instead of hanging forever
        raise RuntimeError(f"a tokenizer worker process died unexpectedly ({e}); nothing was written") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- driver


def _check_config(cfg: PreprocessConfig) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    text_filters = {"min_int_score": cfg.min_int_score, "min_score": cfg.min_score, "min_chars": cfg.min_chars or None}
    used = [f"--{k.replace('_', '-')}" for k, v in text_filters.items() if v is not None]
    if cfg.format != "text" and used:
        raise ValueError(f"{', '.join(used)} filter text documents; --format {cfg.format} records have none "
                         "(use --min-tokens, which applies to every format)")
    if not 0.0 <= cfg.valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={cfg.valid_fraction} must be in [0, 1)")
    for key in ("workers", "shard_size", "min_chars", "min_tokens", "max_docs"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 0")
    if cfg.chunk_docs <= 0:
        raise ValueError(f"chunk_docs={cfg.chunk_docs} must be positive")


def _worker_options(cfg: PreprocessConfig, tok, dtype: np.dtype) -> _WorkerOptions:
    bos, eos = tok.framing(cfg.prepend_bos, cfg.append_eos)  # names a missing BOS / EOS
    return _WorkerOptions(
        filter=RecordFilter(cfg.text_key, cfg.min_int_score, cfg.min_score, cfg.min_chars),
        dtype=dtype.name,
        min_tokens=cfg.min_tokens,
        valid_fraction=cfg.valid_fraction,
        eos_id=-1 if eos is None else eos,
        bos_id=-1 if bos is None or cfg.format == "chat" else bos,  # chat: the template frames it
        record_format=record_format(cfg),
    )


def record_format(cfg: PreprocessConfig) -> RecordFormat:
    return RecordFormat(cfg.format, cfg.prompt_key, cfg.response_key, cfg.messages_key, cfg.tokenizer)


def _write_result(res: ChunkResult, train: ShardedWriter, valid: Optional[ShardedWriter], out: PreprocessResult) -> None:
    """Append one chunk's documents to the train / valid writers and update the counts."""
    out.read += res.read
    out.skipped.update(res.skipped)
    out.worker_seconds += res.busy_seconds
    token_is_valid = np.repeat(res.is_valid, res.lengths)  # (n_tokens,) split of every token
    for split, writer, doc_mask, tok_mask in (
        (out.train, train, ~res.is_valid, ~token_is_valid),
        (out.valid, valid, res.is_valid, token_is_valid),
    ):
        if not doc_mask.any():
            continue
        loss_mask = None if res.loss_mask is None else res.loss_mask[tok_mask]
        writer.add_documents(res.tokens[tok_mask], res.lengths[doc_mask], loss_mask)
        split.documents += int(doc_mask.sum())
        split.tokens += int(res.lengths[doc_mask].sum())
        split.bytes += int(res.nbytes[doc_mask].sum())


def _meta(cfg: PreprocessConfig, tok: dict, opts: _WorkerOptions, sources, writers, out: PreprocessResult) -> str:
    """Contents of P.meta.json: deterministic (no times, no worker count)."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("output_prefix", "workers", "progress", "overwrite", "chunk_docs")}
    options["prepend_bos"] = opts.bos_id >= 0  # as resolved (None: as the tokenizer does)
    framing = " + ".join(["BOS"] * (opts.bos_id >= 0) + ["the text's tokens"] + ["EOS"] * (opts.eos_id >= 0))
    if cfg.format != "text":
        framing = {"prompt_response": framing.replace("the text's tokens", "prompt + response"),
                   "chat": "the chat template's rendering + EOS unless it ends with it"}[cfg.format]
        framing += ("; PREFIX.lossmask.bin/.idx hold one uint8 per token, 1 where the loss applies (" +
                    ("the response and its EOS" if cfg.format == "prompt_response" else "the assistant turns") + ")")
    splits = {}
    for name, stats, writer in (("train", out.train, writers[0]), ("valid", out.valid, writers[1])):
        if writer is None:
            continue
        splits[name] = {
            "prefixes": [os.path.basename(p) for p in writer.prefixes],
            "documents": stats.documents,
            "tokens": stats.tokens,
            "bytes": stats.bytes,
            "bytes_per_token": stats.bytes / stats.tokens if stats.tokens else None,
        }
    meta = {
        "format": "megatron-indexed-v1",
        "records": cfg.format,
        "loss_mask": cfg.format != "text",
        "dtype": opts.dtype,
        "tokenizer": tok,
        "inputs": [s.path for s in sources],
        "options": options,
        "documents_read": out.read,
        "skipped": {k: out.skipped[k] for k in SKIP_REASONS if out.skipped.get(k)},
        "splits": splits,
        "notes": f"each document is {framing} (tokens count them all); bytes are UTF-8 bytes of the kept texts",
    }
    return json.dumps(meta, indent=2) + "\n"


def _progress(cfg: PreprocessConfig, total: Optional[int]):
    from tqdm import tqdm

    # disable=None: tqdm draws only when stderr is a terminal (no bar lines in Slurm logs or CI)
    return tqdm(total=total, unit="doc", disable=None if cfg.progress else True, dynamic_ncols=True,
                file=sys.stderr)


def _open_inputs(cfg: PreprocessConfig) -> tuple[list, ReadOptions, Optional[int]]:
    """(sources, read options, records to read when cheaply known): fails early on bad inputs."""
    sources = expand_inputs(cfg.inputs)
    fmt = record_format(cfg)
    if fmt.masked and any(s.kind != "jsonl" for s in sources):
        raise InputError(f"--format {cfg.format} reads JSON lines (.jsonl, .json, .gz, .zst); got "
                         f"{', '.join(s.path for s in sources if s.kind != 'jsonl')}")
    read_opts = ReadOptions(
        text_key=fmt.required_key() if fmt.masked else cfg.text_key,
        need_int_score=cfg.min_int_score is not None,
        need_score=cfg.min_score is not None,
        split=cfg.split,
        chunk_docs=cfg.chunk_docs,
    )
    counts = [check_source(s, read_opts) for s in sources]
    total = None if None in counts else sum(counts)
    if total is not None and cfg.max_docs:
        total = min(total, cfg.max_docs)
    return sources, read_opts, total


def _tokenize_into(results: Iterator[ChunkResult], train: ShardedWriter, valid: Optional[ShardedWriter],
                   out: PreprocessResult, bar, start: float) -> None:
    """Write every chunk's documents, in input order, updating the counts and the progress bar."""
    for res in results:
        _write_result(res, train, valid, out)
        bar.update(res.read)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{out.tokens / elapsed:,.0f} tok/s", refresh=False)
    if out.train.documents == 0:
        raise ValueError(
            f"no training document was kept from {out.read} records "
            f"(skipped: {dict(out.skipped) or 'none'}); check --text-key and the filters"
        )


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Run the whole pipeline for ``cfg``; returns counts and wall time."""
    from megasink.data.tokenizer import load_tokenizer

    start = time.perf_counter()
    _check_config(cfg)
    check_output_prefix(cfg.output_prefix, cfg.overwrite)
    sources, read_opts, total = _open_inputs(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.format == "chat":  # refuse a tokenizer without a chat template before any worker starts
        from megasink.data.sft import ChatRenderer

        ChatRenderer(cfg.tokenizer, None)
    dtype = token_dtype(tok.vocab_size)
    opts = _worker_options(cfg, tok, dtype)
    out = PreprocessResult()
    new_dirs = new_parent_dirs(cfg.output_prefix)
    masked = opts.record_format.masked
    train = ShardedWriter(cfg.output_prefix, dtype, cfg.shard_size, loss_mask=masked)
    valid = ShardedWriter(valid_prefix(cfg.output_prefix), dtype, loss_mask=masked) if cfg.valid_fraction > 0 else None
    writers = [w for w in (train, valid) if w is not None]
    bar = _progress(cfg, total)
    try:
        with tempfile.TemporaryDirectory(prefix="megasink-tokenizer-") as tmp:
            chunks = iter_chunks(sources, read_opts, cfg.max_docs)
            _tokenize_into(_run_chunks(chunks, cfg.workers, (tok.worker_spec(tmp), opts)), train, valid, out, bar,
                           start)
        for w in writers:
            w.finalize()
        meta = _meta(cfg, tok.info(), opts, sources, (train, valid), out)
        out.outputs = commit_outputs(cfg.output_prefix, writers, meta, cfg.overwrite)
    except BaseException:
        for w in writers:
            w.abort()
        remove_empty_dirs(new_dirs)
        raise
    finally:
        bar.close()
    out.seconds = time.perf_counter() - start
    return out


def summary_line(out: PreprocessResult) -> str:
    """One human-readable line of counts and throughput."""
    rate = out.read / out.seconds if out.seconds else 0.0
    tok_rate = out.tokens / out.seconds if out.seconds else 0.0
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(out.skipped.items())) or "none"
    return (
        f"read {out.read:,} documents; train {out.train.documents:,} docs / {out.train.tokens:,} tokens; "
        f"valid {out.valid.documents:,} docs / {out.valid.tokens:,} tokens; skipped: {skipped}; "
        f"{out.seconds:.1f}s ({rate:,.0f} docs/s, {tok_rate:,.0f} tokens/s)"
    )
