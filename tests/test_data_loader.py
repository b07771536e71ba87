"""Packing, blending, data-parallel sharding and exact resume of the training data loader.

Independent references: windows are compared with slices of the documents concatenated by
numpy, document ids with a per-token Python loop, blend sources with the token ranges each
dataset was built from.
"""
import io
import json

import numpy as np
import pytest
import torch

from data_fixtures import data_documents, data_records, data_tokenizer_model, data_write_parquet
from megasink.config import DataConfig
from megasink.data import (
    BlendedDataset,
    DataLoaderState,
    IndexedDatasetWriter,
    IndexPermutation,
    PackedDataset,
    SyntheticDataset,
    blending_index,
    build_dataset,
    build_loader,
    iter_validation_batches,
    parse_data_paths,
)
from megasink.data.preprocess import PreprocessConfig, preprocess


def write_docs(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(np.asarray(d))
    w.finalize()
    w.commit()
    return str(prefix)


def random_docs(rng, n, low=0, high=100, max_len=40):
    return [rng.integers(low, high, size=int(rng.integers(1, max_len))) for _ in range(n)]


def reference_doc_ids(doc_lengths, start, stop):
    """Document id of each stream position in [start, stop), relative to the first one."""
    owner = [d for d, n in enumerate(doc_lengths) for _ in range(n)]
    ids = owner[start:stop]
    return [i - ids[0] for i in ids]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real preprocessed corpus (parquet in FineWeb-Edu's schema, 2 shards, valid split)."""
    root = tmp_path_factory.mktemp("corpus")
    src = data_write_parquet(root / "fw.parquet", data_records(data_documents(120, seed=3)))
    prefix = str(root / "out" / "fw")
    preprocess(PreprocessConfig(inputs=[src], tokenizer=data_tokenizer_model(), output_prefix=prefix,
                                workers=0, valid_fraction=0.15, shard_size=8000, progress=False))
    return prefix


# --------------------------------------------------------------------------- packing


def test_packed_windows_and_doc_ids_match_the_stream(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50)
    a = write_docs(tmp_path / "a", docs[:20])
    b = write_docs(tmp_path / "b", docs[20:])
    seq_len = 16
    ds = PackedDataset([a, b], seq_len)
    stream = np.concatenate(docs)
    lengths = [len(d) for d in docs]
    assert len(ds) == (len(stream) - 1) // seq_len
    for i in range(len(ds)):
        s = ds[i]
        start, stop = i * seq_len, i * seq_len + seq_len + 1
        assert s["tokens"].dtype == np.int64 and s["tokens"].shape == (seq_len + 1,)
        np.testing.assert_array_equal(s["tokens"], stream[start:stop])
        assert s["doc_ids"].tolist() == reference_doc_ids(lengths, start, stop)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_doc_ids_follow_eos_on_real_data(corpus):
    ds = build_dataset(DataConfig(path=[corpus]), 64, 512, seed=0)
    eos = 2
    for i in range(len(ds)):
        t, d = ds[i]["tokens"], ds[i]["doc_ids"]
        assert d[0] == 0 and np.all(np.diff(d) >= 0)
        for p in np.flatnonzero(t[:-1] == eos):  # the EOS ends doc j, the next token starts j + 1
            assert d[p + 1] == d[p] + 1
        assert np.count_nonzero(np.diff(d)) == np.count_nonzero(t[:-1] == eos)


def test_loader_batch_contract(corpus):
    ds = build_dataset(DataConfig(path=[corpus]), 32, 512, seed=0)
    loader = build_loader(ds, micro_batch_size=4, dp_rank=0, dp_size=1, seed=5)
    batch = loader.next_batch()
    assert set(batch) == {"tokens", "targets", "doc_ids"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (4, 32) and v.device.type == "cpu"
    for row, idx in enumerate(loader.last_indices):
        s = ds[int(idx)]
        assert batch["tokens"][row].tolist() == s["tokens"][:-1].tolist()
        assert batch["targets"][row].tolist() == s["tokens"][1:].tolist()
        assert batch["doc_ids"][row].tolist() == s["doc_ids"][:-1].tolist()


# --------------------------------------------------------------------------- ordering


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 100, 1000, 4097):
        p = IndexPermutation(n, seed=11, epoch=2)
        out = p(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
        assert [p.one(i) for i in range(min(n, 50))] == out[:50].tolist()
    a, b, c = (IndexPermutation(1000, s, e)(np.arange(1000)) for s, e in ((1, 0), (1, 1), (2, 0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.1  # no visible trend
    big = IndexPermutation(2**40, seed=3)(np.arange(5))
    assert len(set(big.tolist())) == 5 and big.max() < 2**40


def epoch_indices(ds, mbs, dp, seed=7):
    loaders = [build_loader(ds, mbs, r, dp, seed) for r in range(dp)]
    per_rank = [[] for _ in range(dp)]
    for _ in range(loaders[0].rounds_per_epoch):
        for r, ld in enumerate(loaders):
            per_rank[r].extend(ld.next_indices().tolist())
    return per_rank


def test_dp_shards_are_disjoint_and_cover_the_epoch():
    ds = SyntheticDataset(8, 50, seed=0)
    ds.NUM_SAMPLES = 120  # a small finite dataset
    for mbs, dp in ((3, 4), (5, 2), (4, 3)):
        per_rank = epoch_indices(ds, mbs, dp)
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)) == (120 // (mbs * dp)) * mbs * dp
        if 120 % (mbs * dp) == 0:
            assert sorted(flat) == list(range(120))
        for r in range(dp):
            for s in range(dp):
                if r != s:
                    assert not set(per_rank[r]) & set(per_rank[s])


def test_dp_run_sees_the_single_process_global_batches(corpus):
    ds = build_dataset(DataConfig(path=[corpus]), 16, 512, seed=0)
    single = build_loader(ds, 2, 0, 1, seed=3)
    ranks = [build_loader(ds, 2, r, 2, seed=3) for r in range(2)]
    for _ in range(10):
        one = torch.cat([single.next_batch()["tokens"], single.next_batch()["tokens"]])
        two = torch.cat([ld.next_batch()["tokens"] for ld in ranks])
        assert torch.equal(one, two)


def test_new_permutation_each_epoch():
    ds = SyntheticDataset(4, 10, seed=0)
    ds.NUM_SAMPLES = 12
    ld = build_loader(ds, 4, 0, 1, seed=1)
    epochs = [[i for _ in range(3) for i in ld.next_indices().tolist()] for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and ld.epoch == 2
    ordered = build_loader(ds, 4, 0, 1, seed=1, shuffle=False)
    assert [i for _ in range(3) for i in ordered.next_indices().tolist()] == list(range(12))


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_after", [0, 3, 13, 29])
def test_resume_in_the_middle_equals_uninterrupted(corpus, stop_after):
    ds = build_dataset(DataConfig(path=[corpus]), 512, 512, seed=0)
    mbs, dp = 3, 2
    assert len(ds) // (mbs * dp) < 20  # 40 steps cross at least one epoch boundary
    whole = [build_loader(ds, mbs, r, dp, seed=9) for r in range(dp)]
    expected = [[ld.next_batch() for _ in range(40)] for ld in whole]
    first = [build_loader(ds, mbs, r, dp, seed=9) for r in range(dp)]
    for ld in first:
        for _ in range(stop_after):
            ld.next_batch()
    for r, ld in enumerate(first):
        saved = json.loads(json.dumps(ld.state_dict()))  # JSON round trip
        buf = io.BytesIO()
        torch.save(saved, buf)  # and torch.save, as in checkpoints
        buf.seek(0)
        resumed = build_loader(build_dataset(DataConfig(path=[corpus]), 512, 512, seed=0), mbs, r, dp, seed=9)
        resumed.load_state_dict(torch.load(buf))
        for step in range(stop_after, 40):
            got = resumed.next_batch()
            for key in ("tokens", "targets", "doc_ids"):
                assert torch.equal(got[key], expected[r][step][key]), (r, step, key)


def test_resume_refuses_other_data_or_seed(corpus):
    ds64 = build_dataset(DataConfig(path=[corpus]), 64, 512, seed=0)
    ds32 = build_dataset(DataConfig(path=[corpus]), 32, 512, seed=0)
    sd = build_loader(ds64, 2, 0, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="data, seq_len or data.path changed"):
        build_loader(ds32, 2, 0, 1, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        build_loader(ds64, 2, 0, 1, seed=2).load_state_dict(sd)
    assert DataLoaderState.from_dict(sd).num_samples == len(ds64)


# --------------------------------------------------------------------------- blending


def test_blending_index_stays_within_one_sample_of_the_weights():
    for weights in ([0.5, 0.5], [0.3, 0.7], [0.2, 0.3, 0.1, 0.4], [0.01, 0.99], [1, 2, 3, 4, 5]):
        w = np.asarray(weights, float) / np.sum(weights)
        which, draws = blending_index(weights, 5000)
        counts = np.zeros(len(w))
        for n, k in enumerate(which, start=1):
            assert draws[n - 1] == counts[k]  # draws of a dataset are numbered 0, 1, 2, ...
            counts[k] += 1
            assert np.all(np.abs(counts - n * w) <= 1.5), (weights, n)


def test_blended_loader_ratios_within_one_percent(tmp_path):
    rng = np.random.default_rng(1)
    sizes = {0: 400, 1: 60, 2: 250}  # dataset 1 is small: upsampled
    prefixes = [write_docs(tmp_path / f"d{k}", random_docs(rng, n, low=100 * k, high=100 * k + 100)) for k, n in sizes.items()]
    weights = [0.5, 0.3, 0.2]
    cfg = DataConfig(path=[f"{w} {p}" for w, p in zip(weights, prefixes)])
    ds = build_dataset(cfg, seq_len=8, vocab_size=512, seed=4)
    assert isinstance(ds, BlendedDataset)
    loader = build_loader(ds, micro_batch_size=50, dp_rank=0, dp_size=1, seed=4)
    counts = np.zeros(3)
    for _ in range(200):  # 10,000 samples
        first_tokens = loader.next_batch()["tokens"][:, 0].numpy()
        counts += np.bincount(first_tokens // 100, minlength=3)
    assert counts.sum() == 10_000
    np.testing.assert_allclose(counts / 10_000, weights, atol=0.01)


def test_blend_upsamples_every_sample_once_per_wrap(tmp_path):
    rng = np.random.default_rng(2)
    small = PackedDataset([write_docs(tmp_path / "s", random_docs(rng, 30, high=50))], 4)
    large = PackedDataset([write_docs(tmp_path / "l", random_docs(rng, 300, high=50))], 4)
    blend = BlendedDataset([small, large], [0.5, 0.5], seed=0)
    picks = [blend.locate(i)[1] for i in range(len(blend)) if blend.locate(i)[0] == 0]
    n = len(small)
    assert len(picks) > 3 * n
    for w in range(len(picks) // n):
        assert sorted(picks[w * n : (w + 1) * n]) == list(range(n))
    assert picks[:n] != picks[n : 2 * n]  # a new order on each wrap


def test_parse_data_paths_forms():
    assert parse_data_paths(["a", "b"]) == [(None, "a"), (None, "b")]
    assert parse_data_paths(["0.3 a", "0.7 b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_paths([0.3, "a", 0.7, "b"]) == [(0.3, "a"), (0.7, "b")]  # Megatron style
    with pytest.raises(ValueError, match="weight for every prefix or for none"):
        parse_data_paths(["0.3 a", "b"])
    with pytest.raises(ValueError, match="not followed by a dataset prefix"):
        parse_data_paths(["0.3"])


# --------------------------------------------------------------------------- build_dataset


def test_build_dataset_real_shards_valid_and_meta(corpus):
    meta = json.load(open(corpus + ".meta.json"))
    assert len(meta["splits"]["train"]["prefixes"]) >= 2  # the prefix resolves to its shards
    train = build_dataset(DataConfig(path=[corpus]), 32, 512, seed=0)
    assert train.num_tokens == meta["splits"]["train"]["tokens"]
    assert train.bytes_per_token == pytest.approx(meta["splits"]["train"]["bytes_per_token"])
    valid = build_dataset(DataConfig(path=[corpus]), 32, 512, seed=0, split="valid")
    assert valid.num_tokens == meta["splits"]["valid"]["tokens"]
    assert valid.bytes_per_token == pytest.approx(meta["splits"]["valid"]["bytes_per_token"])
    explicit = build_dataset(DataConfig(path=[corpus], valid_path=[corpus + "_valid"]), 32, 512, 0, split="valid")
    assert explicit.num_tokens == valid.num_tokens


def test_build_dataset_errors_name_the_problem(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/x"):
        build_dataset(DataConfig(path=[str(tmp_path / "nowhere" / "x")]), 32, 512, 0)
    lone = write_docs(tmp_path / "lone", [np.arange(100) % 50])
    assert len(build_dataset(DataConfig(path=[lone]), 32, 512, 0)) == 3
    assert len(build_dataset(DataConfig(path=[lone + ".bin"]), 32, 512, 0)) == 3  # file name for the prefix
    shard = build_dataset(DataConfig(path=[corpus + "_00000.idx"]), 32, 512, 0)  # one shard: the corpus's meta
    assert shard.bytes_per_token == pytest.approx(json.load(open(corpus + ".meta.json"))["splits"]["train"]["bytes_per_token"])
    with pytest.raises(FileNotFoundError, match="lone_valid.*--valid-fraction"):
        build_dataset(DataConfig(path=[lone]), 32, 512, 0, split="valid")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        build_dataset(DataConfig(path=[lone]), 512, 512, 0)
    with pytest.raises(ValueError, match="larger than model.vocab_size=100"):
        build_dataset(DataConfig(path=[corpus]), 32, 100, 0)
    with pytest.raises(ValueError, match="cannot be mixed"):
        build_dataset(DataConfig(path=["synthetic", corpus]), 32, 512, 0)
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(b"not the tokenizer of this corpus")
    with pytest.raises(ValueError, match="was tokenized with"):
        build_dataset(DataConfig(path=[corpus], tokenizer=str(other_tok)), 32, 512, 0)
    build_dataset(DataConfig(path=[corpus], tokenizer=data_tokenizer_model()), 32, 512, 0)


def test_validation_batches_start_at_the_beginning(corpus):
    valid = build_dataset(DataConfig(path=[corpus]), 16, 512, seed=0, split="valid")
    batches = list(iter_validation_batches(valid, micro_batch_size=2, num_batches=3))
    assert len(batches) == 3
    assert batches[0]["tokens"][0].tolist() == valid[0]["tokens"][:-1].tolist()
    assert batches[2]["tokens"][1].tolist() == valid[5]["tokens"][:-1].tolist()
    again = list(iter_validation_batches(valid, micro_batch_size=2, num_batches=3))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
    everything = list(iter_validation_batches(valid, 2, num_batches=10**6))
    assert len(everything) == len(valid) // 2
    rank1 = list(iter_validation_batches(valid, 2, num_batches=2, dp_rank=1, dp_size=2))
    assert rank1[0]["tokens"][0].tolist() == valid[2]["tokens"][:-1].tolist()


# --------------------------------------------------------------------------- synthetic


def test_synthetic_dataset():
    cfg = DataConfig()  # path = ["synthetic"]
    train = build_dataset(cfg, 64, 97, seed=5)
    again = build_dataset(cfg, 64, 97, seed=5)
    valid = build_dataset(cfg, 64, 97, seed=5, split="valid")
    assert len(train) >= 2**40 and train.bytes_per_token is None
    s = train[123456789]
    assert s["tokens"].shape == (65,) and s["tokens"].min() >= 0 and s["tokens"].max() < 97
    assert np.array_equal(s["tokens"], again[123456789]["tokens"])
    assert not np.array_equal(s["tokens"], valid[123456789]["tokens"])
    ids = np.stack([train[i]["doc_ids"] for i in range(200)])
    assert np.all(ids[:, 0] == 0) and np.all(np.diff(ids, axis=1) >= 0) and np.all(np.diff(ids, axis=1) <= 1)
    assert 1.0 < ids[:, -1].mean() < 6.0  # a few documents per window
    flat = build_dataset(DataConfig(synthetic_docs=False), 64, 97, seed=5)
    assert not flat[0]["doc_ids"].any()
    loader = build_loader(train, 4, 1, 2, seed=5)
    loader.next_batch()
    resumed = build_loader(train, 4, 1, 2, seed=5)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(resumed.next_batch()["tokens"], loader.next_batch()["tokens"])
