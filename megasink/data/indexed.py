"""Megatron-LM's indexed dataset format: ``PREFIX.bin`` (tokens) + ``PREFIX.idx`` (index).

The format is the interface (docs/design.md, "File formats and contracts"): files written
here load in Megatron-LM and files written by Megatron-LM load here. Layout of ``PREFIX.idx``
(little endian), as in ``megatron/core/datasets/indexed_dataset.py`` (``_IndexWriter`` / ``_IndexReader``)::

    offset 0   9 bytes   b"MMIDIDX\\x00\\x00"
    offset 9   <Q        version = 1
    offset 17  <B        dtype code of the tokens in .bin (DType enum below)
    offset 18  <Q        S = sequence count
    offset 26  <Q        D = document count (= number of documents + 1)
    offset 34  int32[S]  sequence lengths in tokens
               int64[S]  sequence byte offsets into .bin
               int64[D]  document indices: sequence index where each document starts,
                         beginning with 0 and ending with S

``PREFIX.bin`` is the raw concatenation of all sequences in that dtype. Our preprocessor
writes one sequence per document (``document_indices == arange(S + 1)``); Megatron's
``--split-sentences`` writes several, which the reader here handles as well.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megasink.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 header + 8 version + 1 dtype code + 8 sequence count + 8 document count

# Megatron's DType enum: code -> numpy dtype.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedFormatError(DataError):
    """A .bin/.idx pair that does not follow the Megatron indexed format."""


def idx_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.idx``."""
    return str(prefix) + ".idx"


def bin_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.bin``."""
    return str(prefix) + ".bin"


def exists(prefix: str | os.PathLike) -> bool:
    """True when both ``PREFIX.bin`` and ``PREFIX.idx`` exist."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def encode_index(sequence_lengths: np.ndarray, document_indices: np.ndarray, dtype) -> bytes:
    """The complete bytes of a ``.idx`` file for these sequences and documents."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    doc_idx = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)  # (S,) byte offsets
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    header = (
        INDEX_HEADER
        + struct.pack("<Q", INDEX_VERSION)
        + struct.pack("<B", CODE_OF_DTYPE[dtype])
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(doc_idx))
    )
    return b"".join(
        [header, lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), doc_idx.astype("<i8").tobytes()]
    )


class IndexedDatasetWriter:
    """Append documents to ``PREFIX.bin`` and write ``PREFIX.idx`` at the end.

    Both files are written under temporary names in the target directory; ``commit()``
    renames them (``.bin`` first, ``.idx`` last), so a crash never leaves an ``.idx`` that
    looks valid next to a short ``.bin``. ``abort()`` removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype, tmp_tag: str = "tmp"):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} is not one of Megatron's DType codes")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tmp_bin = _tmp_name(bin_path(prefix), tmp_tag)
        self.tmp_idx = _tmp_name(idx_path(prefix), tmp_tag)
        self._bin = open(self.tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._finalized = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (one sequence each)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31-1 tokens cannot be indexed")
        self._bin.write(tokens.tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        """Append one document (one sequence)."""
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([len(tokens)]))

    def finalize(self) -> None:
        """Flush ``.bin`` and write the ``.idx`` (still under temporary names)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.tmp_idx, "wb") as f:
            f.write(encode_index(lengths, doc_idx, self.dtype))
            f.flush()
            os.fsync(f.fileno())
        self._finalized = True

    def commit(self) -> None:
        """Rename the finished files into place: ``.bin`` first, ``.idx`` last."""
        if not self._finalized:
            raise RuntimeError("finalize() before commit()")
        os.replace(self.tmp_bin, bin_path(self.prefix))
        os.replace(self.tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files (safe to call more than once)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.unlink(path)


def _tmp_name(path: str, tag: str) -> str:
    p = Path(path)
    return str(p.parent / f".{p.name}.{tag}-{os.getpid()}")


class IndexedDataset:
    """Memory-mapped reader of a ``PREFIX.bin`` / ``PREFIX.idx`` pair.

    Attributes are numpy views into the mapped index: ``sequence_lengths`` (S,) int32,
    ``sequence_pointers`` (S,) int64, ``document_indices`` (D,) int64; ``tokens`` is the
    whole ``.bin`` as a flat array of ``dtype``. ``ds[i]`` is sequence i.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset {self.prefix}: {path} does not exist")
        idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        self.dtype, n_seq, n_doc = _parse_header(ipath, idx)
        expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if len(idx) < expected:
            raise IndexedFormatError(
                f"{ipath}: {len(idx)} bytes, but its header promises {n_seq} sequences and "
                f"{n_doc} document entries ({expected} bytes): the file is truncated"
            )
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(idx, dtype="<i4", count=n_seq, offset=offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(idx, dtype="<i8", count=n_seq, offset=offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=offset)
        self._idx_mmap = idx
        self._check_bin(bpath)

    def _check_bin(self, bpath: str) -> None:
        size = os.path.getsize(bpath)
        itemsize = self.dtype.itemsize
        n_seq = len(self.sequence_lengths)
        needed = 0 if n_seq == 0 else int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        if size < needed:
            raise IndexedFormatError(
                f"{bpath}: {size} bytes, but {idx_path(self.prefix)} points up to byte {needed}: "
                "the .bin is truncated or belongs to another .idx"
            )
        if len(self.document_indices) and int(self.document_indices[-1]) != n_seq:
            raise IndexedFormatError(
                f"{idx_path(self.prefix)}: last document index {int(self.document_indices[-1])} "
                f"!= sequence count {n_seq}"
            )
        if size == 0:  # np.memmap cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bpath, dtype=self.dtype, mode="r", shape=(size // itemsize,))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i`` (a read-only view into the memory map)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        """Documents in the index (the document-index entries minus one)."""
        return max(len(self.document_indices) - 1, 0)

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Per document: (start offset into ``tokens``, length in tokens), both int64 (n_docs,).

        A document is the run of sequences ``document_indices[d] : document_indices[d+1]``;
        those sequences are contiguous in ``.bin``.
        """
        doc_idx = np.asarray(self.document_indices, dtype=np.int64)
        if len(doc_idx) < 2 or len(self) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        seq_cum = np.zeros(len(self) + 1, dtype=np.int64)  # (S+1,) token offsets
        np.cumsum(self.sequence_lengths, out=seq_cum[1:])
        first_seq = np.minimum(doc_idx[:-1], len(self) - 1)
        starts = np.asarray(self.sequence_pointers, dtype=np.int64)[first_seq] // self.dtype.itemsize
        lengths = seq_cum[doc_idx[1:]] - seq_cum[doc_idx[:-1]]
        return starts, lengths


def _parse_header(path: str, idx: np.ndarray) -> tuple[np.dtype, int, int]:
    head = bytes(idx[:HEADER_SIZE])
    if len(head) < HEADER_SIZE or head[:9] != INDEX_HEADER:
        raise IndexedFormatError(
            f"{path}: not a Megatron indexed dataset index (expected header {INDEX_HEADER!r}, "
            f"got {head[:9]!r})"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise IndexedFormatError(f"{path}: index version {version}, only version 1 is supported")
    code = head[17]
    if code not in DTYPE_CODES:
        raise IndexedFormatError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    return np.dtype(DTYPE_CODES[code]), int(n_seq), int(n_doc)
