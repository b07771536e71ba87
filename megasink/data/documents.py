"""Whole documents, one at a time: what measurement reads (head diagnosis and ablation in
megasink/eval/, the offline evaluation tasks), as opposed to training's packed windows
(packing.py).

An input is either an indexed dataset, read as token ids (``PREFIX`` naming ``PREFIX.bin`` +
``PREFIX.idx``, the same with ``.bin`` / ``.idx`` given by mistake, or the shards
``PREFIX_00000``, ... of tools/preprocess_data.py; a document is the run of sequences between
two document indices), or text, read by the preprocessor's own reader and record rules
(sources.py: parquet, JSON lines, optionally .gz / .zst, folders of them, ``datasets``
save_to_disk folders; records.py: invalid or empty records are skipped and counted).

- ``DocumentSource``  the documents of several inputs, in input order;
- ``iter_samples``    up to N non-empty documents truncated to a length, in order or shuffled;
- ``batch_by_length`` samples as (B, T) batches of equal length within a token budget.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from megasink.data.build import canonical_prefix
from megasink.data.indexed import IndexedDataset, exists
from megasink.data.outputs import find_shards
from megasink.data.records import RecordFilter, keep_text, record_fields
from megasink.data.sources import ReadOptions, check_source, expand_inputs, iter_chunks

TEXT_INPUTS = ("a text input (.parquet, .jsonl / .json / .ndjson, optionally .gz or .zst, a folder of them, "
               "or a datasets save_to_disk folder)")


def token_prefixes(path: str | os.PathLike) -> list[str]:
    """The indexed files behind ``path`` (itself, or its shards ``path_NNNNN``); [] if none."""
    prefix = canonical_prefix(str(path))
    return [prefix] if exists(prefix) else find_shards(prefix)


def read_texts(path: str, text_key: str = "text", skipped: Optional[Counter] = None) -> Iterator[str]:
    """The kept texts of a text input, in order, by the preprocessor's reading rules; each
    skipped record counted in ``skipped`` under its reason (records.SKIP_REASONS)."""
    if not any(c in path for c in "*?[") and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: neither an indexed dataset (PREFIX.bin + PREFIX.idx, or shards "
                                f"PREFIX_00000.bin/.idx) nor {TEXT_INPUTS}")
    skipped = Counter() if skipped is None else skipped
    opts, filt = ReadOptions(text_key=text_key), RecordFilter(text_key=text_key)
    sources = expand_inputs([path])
    for source in sources:
        check_source(source, opts)  # names a missing --text-key column before any reading
    for chunk in iter_chunks(sources, opts):
        chunk = chunk.as_lists()
        for i in range(len(chunk.records)):
            fields = record_fields(chunk, i, text_key, skipped)
            if fields is not None and keep_text(*fields, filt, skipped) is not None:
                yield fields[0]


@dataclass(frozen=True)
class TokenDocument:
    """One document of an indexed dataset: ``length`` tokens from offset ``start`` of its ``.bin``."""

    dataset: IndexedDataset
    start: int
    length: int


class DocumentSource:
    """The documents of several inputs, in order: ``TokenDocument`` for indexed datasets, ``str``
    for text (read at construction, encoded only when sampled)."""

    def __init__(self, paths: Iterable, text_key: str = "text"):
        self.docs: list = []  # TokenDocument | str
        self.skipped: Counter = Counter()  # text records skipped, by reason
        self.has_text = False
        for path in paths:
            prefixes = token_prefixes(path)
            for prefix in prefixes:
                ds = IndexedDataset(prefix)
                starts, lengths = ds.document_spans()  # (D,), (D,)
                self.docs.extend(TokenDocument(ds, int(s), int(n)) for s, n in zip(starts, lengths))
            if not prefixes:
                self.docs.extend(read_texts(str(path), text_key, self.skipped))
                self.has_text = True

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, i: int, limit: Optional[int] = None,
               encode: Optional[Callable[[str], list]] = None) -> np.ndarray:
        """int64 (n,): document i's first ``limit`` tokens (all with None); text is encoded with ``encode``."""
        doc = self.docs[i]
        if isinstance(doc, TokenDocument):
            n = doc.length if limit is None else min(doc.length, limit)
            return np.asarray(doc.dataset.tokens[doc.start:doc.start + n], dtype=np.int64)
        if encode is None:
            raise ValueError("text input needs a tokenizer to become token ids (none found with the model; "
                             "pass --tokenizer)")
        return np.asarray(encode(doc)[:limit], dtype=np.int64)

    def text(self, i: int, decode: Optional[Callable[[list], str]] = None) -> str:
        """Document i as text; token ids are decoded with ``decode``."""
        doc = self.docs[i]
        if isinstance(doc, str):
            return doc
        if decode is None:
            raise ValueError(f"{doc.dataset.prefix}: token ids need their tokenizer to become text (pass --tokenizer)")
        return decode(doc.dataset.tokens[doc.start:doc.start + doc.length])

    def datasets(self) -> list[IndexedDataset]:
        """The indexed datasets read, in order (each once)."""
        seen: dict = {}
        for doc in self.docs:
            if isinstance(doc, TokenDocument):
                seen.setdefault(id(doc.dataset), doc.dataset)
        return list(seen.values())


def iter_samples(source: DocumentSource, num_samples: int, seq_len: int, shuffle_seed: Optional[int] = None,
                 encode: Optional[Callable[[str], list]] = None) -> Iterator[np.ndarray]:
    """Up to ``num_samples`` non-empty documents truncated to ``seq_len`` tokens (int64 arrays),
    in input order, or in a permutation seeded by ``shuffle_seed``."""
    order = np.arange(len(source))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(source))
    taken = 0
    for i in order:
        if taken >= num_samples:
            return
        tokens = source.tokens(int(i), seq_len, encode)
        if len(tokens):
            taken += 1
            yield tokens


def batch_by_length(samples: Iterable[np.ndarray], max_batch_tokens: int, min_tokens: int = 1) -> Iterator[np.ndarray]:
    """Samples of at least ``min_tokens`` tokens as (B, T) int64 batches of one length T, each
    at most ``max_batch_tokens`` tokens (a longer sample alone), without padding. A batch goes
    out as soon as it is full; the partial ones at the end, by length in order of appearance."""
    buckets: dict[int, list] = {}
    for s in samples:
        n = len(s)
        if n < min_tokens:
            continue
        bucket = buckets.setdefault(n, [])
        bucket.append(s)
        if len(bucket) >= max(1, max_batch_tokens // n):
            yield np.stack(bucket)  # (B, T)
            buckets[n] = []
    for bucket in buckets.values():
        if bucket:
            yield np.stack(bucket)  # (B, T)
