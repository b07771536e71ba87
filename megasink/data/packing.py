"""GPT-style packing of documents into training windows, and the synthetic stand-in.

A :class:`PackedDataset` concatenates the documents of one or more indexed files (the
shards of a prefix) in file order into one token stream and cuts it into windows of
``seq_len + 1`` tokens; window i covers stream positions ``[i*seq_len, (i+1)*seq_len + 1)``,
so consecutive windows share one token and every token after the first is a target
exactly once (as in Megatron's GPTDataset). Sample order is shuffled by the loader.

Each sample carries ``doc_ids``: 0 for the window's first (possibly partial) document,
+1 at each document start inside the window. A token belongs to the document it ends:
the EOS that closes document j has id j, the next token starts document j+1. Document
starts come from the ``.idx`` document indices, so files written by Megatron-LM (with or
without ``--append-eod``, with or without sentence splitting) carry the same boundaries.

When every file X has a loss mask beside it (``X.lossmask``, written for prompt/response and
chat records, megasink/data/sft.py), each sample also carries ``loss_mask``, uint8
(seq_len+1,): 1 where the token is a target of the LM loss.

Index memory: one int64 per document (its start in the stream); tokens stay memory-mapped.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from megasink.data.indexed import IndexedDataset, IndexedFormatError, exists
from megasink.data.sft import loss_mask_prefix


def document_starts(ds: IndexedDataset) -> np.ndarray:
    """Token offsets (int64, sorted) where each document of ``ds`` starts in its ``.bin``.

    Requires the sequences to be stored back to back (as Megatron and we write them).
    """
    seq_cum = np.zeros(len(ds) + 1, dtype=np.int64)  # (S+1,) token offset of each sequence
    np.cumsum(ds.sequence_lengths, out=seq_cum[1:])
    if not np.array_equal(np.asarray(ds.sequence_pointers, dtype=np.int64), seq_cum[:-1] * ds.dtype.itemsize):
        raise IndexedFormatError(
            f"{ds.prefix}.idx: sequences are not stored contiguously in {ds.prefix}.bin; packing needs a "
            "contiguous file (rewrite it with tools/preprocess_data.py or Megatron's merge tool)"
        )
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
    if len(doc_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any(np.diff(doc_idx) < 0) or doc_idx[0] != 0:
        raise IndexedFormatError(f"{ds.prefix}.idx: document indices must start at 0 and not decrease")
    return seq_cum[doc_idx[:-1]]


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over the documents of ``prefixes`` (in order).

    ``ds[i]`` -> ``{"tokens": int64 (seq_len+1,), "doc_ids": int64 (seq_len+1,)}`` and, when the
    files have loss masks, ``"loss_mask": uint8 (seq_len+1,)``.
    """

    def __init__(self, prefixes: list[str], seq_len: int, bytes_per_token: Optional[float] = None, name: str = ""):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.prefixes = list(prefixes)
        self.name = name or (self.prefixes[0] if len(self.prefixes) == 1 else f"{self.prefixes[0]} (+{len(self.prefixes) - 1} shards)")
        self.seq_len = seq_len
        self.bytes_per_token = bytes_per_token
        self.files = [IndexedDataset(p) for p in self.prefixes]
        self.masks = _loss_masks(self.prefixes, self.files)
        totals = np.array([f.num_tokens for f in self.files], dtype=np.int64)
        self.file_offsets = np.zeros(len(self.files) + 1, dtype=np.int64)  # (F+1,) stream offsets
        np.cumsum(totals, out=self.file_offsets[1:])
        starts = [document_starts(f) + off for f, off in zip(self.files, self.file_offsets[:-1])]
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)  # (n_docs,)
        self.num_tokens = int(self.file_offsets[-1])
        self.num_documents = len(self.doc_starts)
        self._len = max((self.num_tokens - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self._len

    def _read(self, files: list, start: int, stop: int, out: np.ndarray) -> None:
        """Copy stream positions [start, stop) of ``files`` (the token files or their masks) into
        ``out`` (crossing file boundaries)."""
        f = int(np.searchsorted(self.file_offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            off = int(self.file_offsets[f])
            end = min(stop, int(self.file_offsets[f + 1]))
            out[pos - start : end - start] = files[f].tokens[pos - off : end - off]
            pos = end
            f += 1

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples of {self.name}")
        start = i * self.seq_len
        stop = start + self.seq_len + 1
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        self._read(self.files, start, stop, tokens)
        # documents starting strictly inside the window bump the id (repeats: empty documents)
        lo = int(np.searchsorted(self.doc_starts, start, side="right"))
        hi = int(np.searchsorted(self.doc_starts, stop, side="left"))
        marks = np.zeros(self.seq_len + 1, dtype=np.int64)
        marks[self.doc_starts[lo:hi] - start] = 1
        sample = {"tokens": tokens, "doc_ids": np.cumsum(marks)}
        if self.masks is not None:
            sample["loss_mask"] = np.empty(self.seq_len + 1, dtype=np.uint8)
            self._read(self.masks, start, stop, sample["loss_mask"])
        return sample

    def __repr__(self) -> str:
        return f"PackedDataset({self.name!r}, seq_len={self.seq_len}, samples={self._len}, tokens={self.num_tokens})"


def _loss_masks(prefixes: list[str], files: list[IndexedDataset]) -> Optional[list[IndexedDataset]]:
    """The loss masks of ``files`` (each with its documents' lengths), None when they have none;
    an error when only some have one or a mask does not fit its tokens."""
    have = [exists(loss_mask_prefix(p)) for p in prefixes]
    if not any(have):
        return None
    if not all(have):
        missing = [p for p, h in zip(prefixes, have) if not h]
        raise IndexedFormatError(f"{missing[0]}: no {loss_mask_prefix(missing[0])}.bin/.idx while other files of "
                                 "the dataset have loss masks: preprocess the whole corpus with the same --format")
    masks = [IndexedDataset(loss_mask_prefix(p)) for p in prefixes]
    for p, f, m in zip(prefixes, files, masks):
        if not np.array_equal(np.asarray(m.sequence_lengths), np.asarray(f.sequence_lengths)):
            raise IndexedFormatError(f"{loss_mask_prefix(p)}: its documents do not match {p}'s tokens: write them "
                                     "again with tools/preprocess_data.py")
    return masks


class SyntheticDataset:
    """Seeded random tokens in ``[0, vocab_size)``; sample i depends only on (seed, stream, i).

    With ``documents``, each window is cut into random-length documents (on average about
    three boundaries per window) so document masking is exercised. ``stream`` separates
    the training (0) and validation (1) streams. The number of samples is effectively
    unbounded (2**40).
    """

    NUM_SAMPLES = 2**40

    def __init__(self, seq_len: int, vocab_size: int, seed: int, stream: int = 0, documents: bool = True):
        if seq_len <= 0 or vocab_size <= 0:
            raise ValueError(f"seq_len ({seq_len}) and vocab_size ({vocab_size}) must be positive")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self.stream = int(stream)
        self.documents = documents
        self.bytes_per_token = None
        self.name = f"synthetic(stream={stream})"

    def __len__(self) -> int:
        return self.NUM_SAMPLES

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.NUM_SAMPLES:
            raise IndexError(f"sample {i} out of range for the synthetic dataset")
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.stream, i])
        n = self.seq_len + 1
        tokens = rng.integers(0, self.vocab_size, size=n, dtype=np.int64)
        if not self.documents:
            return {"tokens": tokens, "doc_ids": np.zeros(n, dtype=np.int64)}
        marks = (rng.random(n) < 3.0 / n).astype(np.int64)  # (n,) 1 where a new document starts
        marks[0] = 0
        return {"tokens": tokens, "doc_ids": np.cumsum(marks)}

    def __repr__(self) -> str:
        return f"SyntheticDataset(seq_len={self.seq_len}, vocab_size={self.vocab_size}, seed={self.seed}, stream={self.stream})"
