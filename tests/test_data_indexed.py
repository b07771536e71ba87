"""The .bin/.idx format, checked byte by byte against Megatron-LM's documented layout.

Reference (megatron/core/datasets/indexed_dataset.py, _IndexWriter/_IndexReader):
b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code (DType enum: uint16 = 8, int32 = 4),
<Q sequence count, <Q document count, int32 lengths, int64 byte pointers, int64
document indices (0, ..., sequence count).
"""
import struct
import warnings

import numpy as np
import pytest

from megasink.data.indexed import IndexedDataset, IndexedDatasetWriter, IndexedFormatError, token_dtype
from megasink.data.packing import PackedDataset


def _megatron_idx_bytes(lengths, doc_indices, code, itemsize):
    """An .idx written from the documented layout with struct only (independent of megasink)."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    ptr = 0
    for n in lengths:
        out += struct.pack("<q", ptr)
        ptr += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_indices)
    return out


def _write(prefix, docs, dtype):
    w = IndexedDatasetWriter(prefix, dtype)
    for d in docs:
        w.add_document(np.array(d))
    w.finalize()
    w.commit()


def test_idx_layout_byte_by_byte_uint16(tmp_path):
    docs = [[5, 6, 7, 2], [9, 2], [1, 65535, 300, 4, 2]]
    prefix = str(tmp_path / "x")
    _write(prefix, docs, np.uint16)
    expected = _megatron_idx_bytes([4, 2, 5], [0, 1, 2, 3], code=8, itemsize=2)
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == b"".join(struct.pack("<H", t) for d in docs for t in d)


def test_idx_layout_int32_for_large_vocab(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    docs = [[70000, 1, 2], [3]]
    prefix = str(tmp_path / "y")
    _write(prefix, docs, token_dtype(100_000))
    idx = open(prefix + ".idx", "rb").read()
    assert idx[17] == 4  # DType.int32
    assert idx == _megatron_idx_bytes([3, 1], [0, 1, 2], code=4, itemsize=4)
    assert open(prefix + ".bin", "rb").read() == b"".join(struct.pack("<i", t) for d in docs for t in d)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and ds[0].tolist() == [70000, 1, 2]


def test_reads_megatron_sentence_split_file_without_eod(tmp_path):
    """Two documents of several sequences (Megatron --split-sentences, no --append-eod)."""
    seqs = [[10, 11], [12], [13, 14, 15], [20, 21], [22]]
    doc_indices = [0, 3, 5]  # doc 0 = seqs 0-2, doc 1 = seqs 3-4
    prefix = str(tmp_path / "meg")
    with open(prefix + ".idx", "wb") as f:
        f.write(_megatron_idx_bytes([len(s) for s in seqs], doc_indices, code=8, itemsize=2))
    with open(prefix + ".bin", "wb") as f:
        f.write(np.array([t for s in seqs for t in s], dtype="<u2").tobytes())
    ds = IndexedDataset(prefix)
    assert len(ds) == 5 and ds.num_documents == 2 and ds.num_tokens == 9
    assert [ds[i].tolist() for i in range(5)] == seqs
    starts, lengths = ds.document_spans()
    assert starts.tolist() == [0, 6] and lengths.tolist() == [6, 3]
    packed = PackedDataset([prefix], seq_len=8)
    assert len(packed) == 1  # (9 - 1) // 8
    s = packed[0]
    assert s["tokens"].tolist() == [10, 11, 12, 13, 14, 15, 20, 21, 22]
    assert s["doc_ids"].tolist() == [0] * 6 + [1] * 3  # boundaries from the document indices


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"XXIDIDX\x00\x00" + b[9:], "header"),
        (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version"),
        (lambda b: b[:17] + bytes([9]) + b[18:], "dtype code"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:20], "header"),
    ],
)
def test_corrupt_idx_is_a_clear_error(tmp_path, corrupt, message):
    prefix = str(tmp_path / "c")
    _write(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    data = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(IndexedFormatError, match=message):
        IndexedDataset(prefix)


def test_truncated_bin_and_missing_files(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(IndexedFormatError, match="truncated"):
        IndexedDataset(prefix)
    with pytest.raises(FileNotFoundError, match="nothere.idx"):
        IndexedDataset(str(tmp_path / "nothere"))


def test_writer_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "a")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document(np.array([1, 2, 3]))
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path):
    """Cross-check with Megatron's own IndexedDataset / IndexedDatasetBuilder when installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch

    docs = [[5, 6, 7, 2], [9, 2], [1, 60000, 300, 4, 2]]
    ours = str(tmp_path / "ours")
    _write(ours, docs, np.uint16)
    theirs_view = mi.IndexedDataset(ours)
    assert [theirs_view[i].tolist() for i in range(3)] == docs
    assert theirs_view.document_indices.tolist() == [0, 1, 2, 3]

    theirs = str(tmp_path / "theirs")
    builder = mi.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(theirs + ".idx")
    assert open(theirs + ".idx", "rb").read() == open(ours + ".idx", "rb").read()
    assert open(theirs + ".bin", "rb").read() == open(ours + ".bin", "rb").read()
    ds = IndexedDataset(theirs)
    assert [ds[i].tolist() for i in range(3)] == docs
