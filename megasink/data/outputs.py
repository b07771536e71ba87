"""File names of a preprocessed corpus, sharded writing, and the all-or-nothing commit.

For an output prefix ``P``::

    P.bin, P.idx                 training documents (no --shard-size)
    P_00000.bin, P_00000.idx...  training shards (with --shard-size)
    P_valid.bin, P_valid.idx     held-out validation documents (--valid-fraction > 0)
    X.lossmask.bin, X.lossmask.idx   beside every token file X above, for prompt_response / chat
                                 records: one uint8 per token, 1 where the loss applies (sft.py)
    P.meta.json                  tokenizer, options, counts (written last)
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from megasink.data.indexed import IndexedDatasetWriter, bin_path, idx_path
from megasink.data.sft import loss_mask_prefix

SHARD_DIGITS = 5


class OutputExistsError(FileExistsError):
    """The output prefix already has files and --overwrite was not given."""


def shard_prefix(prefix: str, index: int) -> str:
    """``PREFIX_00003`` for index 3."""
    return f"{prefix}_{index:0{SHARD_DIGITS}d}"


def valid_prefix(prefix: str) -> str:
    """``PREFIX_valid``: the held-out split."""
    return f"{prefix}_valid"


def meta_path(prefix: str) -> str:
    """``PREFIX.meta.json``."""
    return f"{prefix}.meta.json"


def find_shards(prefix: str) -> list[str]:
    """Prefixes ``P_00000``, ``P_00001``, ... that have an ``.idx`` file, in order."""
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_(\d{%d})\.idx$" % SHARD_DIGITS)
    found = []
    for path in glob.glob(glob.escape(prefix) + "_" + "[0-9]" * SHARD_DIGITS + ".idx"):
        m = pattern.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path[: -len(".idx")]))
    return [p for _, p in sorted(found)]


def existing_outputs(prefix: str) -> list[str]:
    """Files at ``prefix`` that a preprocessing run would write (or has written)."""
    data = [prefix, valid_prefix(prefix)]
    data += [loss_mask_prefix(p) for p in data]
    names = [f for p in data for f in (bin_path(p), idx_path(p))] + [meta_path(prefix)]
    found = [p for p in names if os.path.exists(p)]
    shards = glob.escape(prefix) + "_" + "[0-9]" * SHARD_DIGITS
    for ext in (".bin", ".idx", ".lossmask.bin", ".lossmask.idx"):
        found += sorted(glob.glob(shards + ext))
    return found


def check_output_prefix(prefix: str, overwrite: bool) -> None:
    """Refuse to write over an existing corpus unless ``overwrite``."""
    found = existing_outputs(prefix)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise OutputExistsError(
            f"output prefix {prefix} already exists ({shown}); pass --overwrite to replace it "
            "or choose another --output-prefix"
        )


class ShardedWriter:
    """Indexed-dataset writer that starts a new shard after ``shard_tokens`` tokens.

    ``shard_tokens == 0`` writes one file at ``prefix``; otherwise shards ``prefix_00000``,
    ``prefix_00001``, ... where a shard closes after the document that brings it to
    ``shard_tokens`` or more (documents are never split). With ``loss_mask`` every token file X
    gets its mask X.lossmask (uint8, the same documents).
    """

    def __init__(self, prefix: str, dtype, shard_tokens: int = 0, loss_mask: bool = False):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.loss_mask = loss_mask
        self.writers, self.mask_writers = [], []
        self._open(shard_prefix(prefix, 0) if self.shard_tokens else prefix)

    def _open(self, prefix: str) -> IndexedDatasetWriter:
        self.writers.append(IndexedDatasetWriter(prefix, self.dtype))
        if self.loss_mask:
            self.mask_writers.append(IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8))
        return self.writers[-1]

    @property
    def prefixes(self) -> list[str]:
        """File prefixes written so far (one per shard)."""
        return [w.prefix for w in self.writers]

    @property
    def num_documents(self) -> int:
        """Documents written over all shards."""
        return sum(w.num_documents for w in self.writers)

    @property
    def num_tokens(self) -> int:
        """Tokens written over all shards."""
        return sum(w.num_tokens for w in self.writers)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, loss_mask=None) -> None:
        """Append documents (flat ``tokens``, per-document ``lengths``, and with ``loss_mask`` on
        their flat uint8 masks) in order."""
        if self.loss_mask != (loss_mask is not None):
            raise ValueError(f"{self.prefix}: a writer {'with' if self.loss_mask else 'without'} loss masks got "
                             f"documents {'without' if loss_mask is None else 'with'} one")
        if not self.shard_tokens:
            self._add(0, tokens, lengths, loss_mask)
            return
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (n+1,) token offsets
        np.cumsum(lengths, out=offsets[1:])
        start = 0
        while start < len(lengths):
            current = self.writers[-1]
            if current.num_tokens >= self.shard_tokens:
                current = self._open(shard_prefix(self.prefix, len(self.writers)))
            room = self.shard_tokens - current.num_tokens
            # documents start..stop-1 go here; the one that crosses the limit is included
            reach = offsets[start + 1 :] - offsets[start]
            stop = start + min(int(np.searchsorted(reach, room, side="left")) + 1, len(lengths) - start)
            span = slice(offsets[start], offsets[stop])
            self._add(len(self.writers) - 1, tokens[span], lengths[start:stop],
                      None if loss_mask is None else loss_mask[span])
            start = stop

    def _add(self, shard: int, tokens, lengths, loss_mask) -> None:
        self.writers[shard].add_documents(tokens, lengths)
        if loss_mask is not None:
            self.mask_writers[shard].add_documents(loss_mask, lengths)

    def finalize(self) -> None:
        """Write every shard's .idx (under temporary names)."""
        for w in self.writers + self.mask_writers:
            w.finalize()

    def commit(self) -> None:
        """Rename every shard into place."""
        for w in self.writers + self.mask_writers:
            w.commit()

    def abort(self) -> None:
        """Delete every shard's temporary files."""
        for w in self.writers + self.mask_writers:
            w.abort()

    def output_files(self) -> list[str]:
        """Final .bin/.idx paths of all shards (and their masks)."""
        return [f for w in self.writers + self.mask_writers for f in (bin_path(w.prefix), idx_path(w.prefix))]


def commit_outputs(prefix: str, writers: list, meta_text: str, overwrite: bool) -> list[str]:
    """Move finished files into place: stale outputs removed, data renamed, meta.json last."""
    from megasink.utils import atomic_write_text, fsync_dir

    new_files = [f for w in writers for f in w.output_files()] + [meta_path(prefix)]
    stale = [f for f in existing_outputs(prefix) if f not in new_files or f == meta_path(prefix)]
    if stale and not overwrite:  # appeared while this run was working
        check_output_prefix(prefix, overwrite)
    # meta.json goes first so that no reader sees an old meta next to new data
    for path in sorted(stale, key=lambda p: p != meta_path(prefix)):
        os.unlink(path)
    for w in writers:
        w.commit()
    atomic_write_text(meta_path(prefix), meta_text)
    fsync_dir(os.path.dirname(os.path.abspath(prefix)))
    return new_files


def new_parent_dirs(prefix: str) -> list[str]:
    """Directories above ``prefix`` that do not exist yet, deepest first: what writing creates."""
    found, d = [], os.path.dirname(os.path.abspath(prefix))
    while not os.path.exists(d):
        found.append(d)
        d = os.path.dirname(d)
    return found


def remove_empty_dirs(dirs: list[str]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty: a failed run leaves no empty directory."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:  # not empty (another writer) or already gone
            return
