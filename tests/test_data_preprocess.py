"""tools/preprocess_data.py and megasink.data.preprocess: round trip, formats, determinism, bad input.

References: sentencepiece's own ``encode`` (+ EOS) for the tokens, Python's ``len(text.encode())``
for the bytes, struct-free numpy views of the files for the layout (the byte-level layout is
tested in test_data_indexed.py).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from data_fixtures import (
    data_documents,
    data_records,
    data_tokenizer_model,
    data_write_jsonl,
    data_write_parquet,
)
from megasink.data.indexed import IndexedDataset
from megasink.data.outputs import OutputExistsError
from megasink.data.preprocess import PreprocessConfig, preprocess
from megasink.data.sources import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 60


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=data_tokenizer_model())


@pytest.fixture(scope="module")
def docs():
    return data_documents(N_DOCS, seed=1)


def run(inputs, prefix, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("chunk_docs", 16)
    return preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], tokenizer=data_tokenizer_model(), output_prefix=str(prefix), **kw))


def sequences(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def file_bytes(paths):
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def test_round_trip_equals_sentencepiece_plus_eos(tmp_path, sp, docs):
    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    out = run([src], tmp_path / "out" / "p")
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert sequences(tmp_path / "out" / "p") == expected
    ds = IndexedDataset(str(tmp_path / "out" / "p"))
    assert ds.dtype == np.uint16 and ds.document_indices.tolist() == list(range(N_DOCS + 1))
    meta = json.load(open(tmp_path / "out" / "p.meta.json"))
    train = meta["splits"]["train"]
    assert train["documents"] == N_DOCS == out.train.documents
    assert train["tokens"] == sum(map(len, expected))
    assert train["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert train["bytes_per_token"] == pytest.approx(train["bytes"] / train["tokens"])
    assert meta["tokenizer"]["eos_id"] == sp.eos_id() and meta["tokenizer"]["vocab_size"] == 512
    assert meta["skipped"] == {}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "dir", "glob", "saved", "saved_dict"])
def test_every_input_format_gives_the_parquet_bytes(tmp_path, docs, fmt):
    rows = data_records(docs)
    ref = tmp_path / "ref" / "p"
    run([data_write_parquet(tmp_path / "ref.parquet", rows)], ref)
    if fmt.startswith("jsonl"):
        inputs = [data_write_jsonl(tmp_path / f"in.{fmt}", rows)]
    elif fmt in ("dir", "glob"):
        (tmp_path / "d" / "sub").mkdir(parents=True)
        data_write_parquet(tmp_path / "d" / "a_000.parquet", rows[:20])
        data_write_jsonl(tmp_path / "d" / "sub" / "b_001.jsonl.gz", rows[40:])
        data_write_parquet(tmp_path / "d" / "b_000.parquet", rows[20:40])
        # sorted paths: a_000, b_000, sub/b_001 (the order of the rows)
        inputs = [tmp_path / "d"] if fmt == "dir" else [str(tmp_path / "d" / "**" / "*_00[01].*")]
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if fmt == "saved_dict":
            ds = datasets.DatasetDict({"train": ds})
        ds.save_to_disk(str(tmp_path / "saved"))
        inputs = [tmp_path / "saved"]
    run(inputs, tmp_path / "out" / "p")
    ref_files = [str(ref) + e for e in (".bin", ".idx")]
    got_files = [str(tmp_path / "out" / "p") + e for e in (".bin", ".idx")]
    assert list(file_bytes(got_files).values()) == list(file_bytes(ref_files).values())


def test_deterministic_bytes_for_any_worker_count(tmp_path, docs):
    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    outs = []
    for name, workers in (("a", 2), ("b", 2), ("c", 0)):
        prefix = tmp_path / name / "p"
        res = run([src], prefix, workers=workers, valid_fraction=0.2, shard_size=2000)
        outs.append(file_bytes(sorted(res.outputs)))
    assert len(outs[0]) >= 5  # shards, valid, meta
    assert outs[0] == outs[1] == outs[2]


def test_valid_split_and_shards(tmp_path, sp, docs):
    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    prefix = tmp_path / "out" / "p"
    run([src], prefix, valid_fraction=0.25, shard_size=3000)
    meta = json.load(open(str(prefix) + ".meta.json"))
    shards = meta["splits"]["train"]["prefixes"]
    assert shards == [f"p_{i:05d}" for i in range(len(shards))] and len(shards) >= 2
    train = [s for name in shards for s in sequences(tmp_path / "out" / name)]
    for name in shards[:-1]:  # a shard closes with the document that reaches the size
        lens = [len(s) for s in sequences(tmp_path / "out" / name)]
        assert sum(lens) >= 3000 and sum(lens) - lens[-1] < 3000
    valid = sequences(str(prefix) + "_valid")
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert 0 < len(valid) < N_DOCS // 2
    assert sorted(train + valid) == sorted(expected)
    # both splits keep input order
    positions = {tuple(e): i for i, e in enumerate(expected)}
    for split in (train, valid):
        idx = [positions[tuple(s)] for s in split]
        assert idx == sorted(idx)
    assert meta["splits"]["valid"]["documents"] == len(valid)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["valid"]["tokens"] == sum(map(len, expected))


def test_filters_int_score_and_length(tmp_path, sp, docs):
    rows = data_records(docs)
    src = data_write_parquet(tmp_path / "in.parquet", rows)
    out = run([src], tmp_path / "o" / "p", min_int_score=3, min_chars=300)
    keep = [r["text"] for r in rows if r["int_score"] >= 3 and len(r["text"]) >= 300]
    assert sequences(tmp_path / "o" / "p") == [sp.encode(t) + [sp.eos_id()] for t in keep]
    low = sum(r["int_score"] < 3 for r in rows)
    assert out.skipped["low_int_score"] == low
    assert out.skipped["too_short"] == sum(r["int_score"] >= 3 and len(r["text"]) < 300 for r in rows)
    meta = json.load(open(tmp_path / "o" / "p.meta.json"))
    assert meta["skipped"]["low_int_score"] == low and meta["options"]["min_int_score"] == 3


def test_missing_text_column_names_the_columns(tmp_path, docs):
    rows = [{k: v for k, v in r.items() if k != "text"} | {"content": r["text"]} for r in data_records(docs[:5])]
    for src in (data_write_parquet(tmp_path / "a.parquet", rows), data_write_jsonl(tmp_path / "a.jsonl", rows)):
        with pytest.raises(InputError, match=r"no column 'text'.*columns are: id, dump, url.*content") as e:
            run([src], tmp_path / "o" / "p")
        assert src in str(e.value)
    assert not (tmp_path / "o").exists()
    out = run([tmp_path / "a.parquet"], tmp_path / "o" / "p", text_key="content")
    assert out.train.documents == 5
    rows2 = [{k: v for k, v in r.items() if k != "int_score"} for r in data_records(docs[:5])]
    with pytest.raises(InputError, match="no column 'int_score'"):
        run([data_write_parquet(tmp_path / "b.parquet", rows2)], tmp_path / "o2" / "p", min_int_score=3)


def test_bad_documents_are_counted_skips(tmp_path, sp, docs):
    good = data_records(docs[:6])
    bad_lines = [
        json.dumps(good[0]).encode() + b"\n",
        b'{"text": "   \\n\\t  ", "id": "w"}\n',  # whitespace only
        b'{"text": "", "id": "e"}\n',  # empty
        b'{"text": "caf\xe9 is latin-1", "id": "u"}\n',  # invalid UTF-8 bytes
        b'{"text": "lone \\ud800 surrogate", "id": "s"}\n',  # not encodable as UTF-8
        b'{"text": null, "id": "n"}\n',
        b'{"text": 42, "id": "i"}\n',
        b'{"id": "no text key"}\n',
        b'{"text": "truncated json\n',
        json.dumps(good[1]).encode() + b"\n",
    ]
    src = data_write_jsonl(tmp_path / "bad.jsonl", bad_lines)
    out = run([src], tmp_path / "o" / "p")
    assert sequences(tmp_path / "o" / "p") == [sp.encode(docs[i]) + [sp.eos_id()] for i in (0, 1)]
    assert dict(out.skipped) == {"empty": 2, "invalid_utf8": 2, "missing_text": 2, "not_text": 1, "invalid_json": 1}
    meta = json.load(open(tmp_path / "o" / "p.meta.json"))
    assert meta["documents_read"] == 10 and sum(meta["skipped"].values()) == 8


def test_invalid_utf8_and_nulls_in_parquet(tmp_path, sp, docs):
    texts = [docs[0].encode(), b"caf\xe9 latin-1", b"   ", None, docs[1].encode()]
    rows = data_records(["x"] * 5)
    for r, t in zip(rows, texts):
        r["text"] = t
    src = data_write_parquet(tmp_path / "b.parquet", rows, text_type=pa.binary())
    out = run([src], tmp_path / "o" / "p")
    assert sequences(tmp_path / "o" / "p") == [sp.encode(docs[i]) + [sp.eos_id()] for i in (0, 1)]
    assert dict(out.skipped) == {"invalid_utf8": 1, "empty": 1, "missing_text": 1}
    # a string column holding unvalidated bytes (as a buggy writer may produce)
    binary = pa.array([docs[2].encode(), b"\xff\xfe bad"], type=pa.binary())
    strings = pa.Array.from_buffers(pa.string(), 2, binary.buffers())
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": strings, "int_score": [3, 3]}), str(tmp_path / "s.parquet"))
    out = run([tmp_path / "s.parquet"], tmp_path / "o2" / "p")
    assert out.train.documents == 1 and dict(out.skipped) == {"invalid_utf8": 1}


def test_truncated_inputs_are_errors_and_write_nothing(tmp_path, docs):
    rows = data_records(docs)
    pq_path = data_write_parquet(tmp_path / "t.parquet", rows)
    data = open(pq_path, "rb").read()
    with open(pq_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.parquet is not a readable parquet file"):
        run([pq_path], tmp_path / "o" / "p")
    gz = data_write_jsonl(tmp_path / "t.jsonl.gz", rows)
    data = open(gz, "rb").read()
    with open(gz, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.jsonl.gz: read failed"):
        run([gz], tmp_path / "o" / "p", chunk_docs=4)  # fails after some chunks were written
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_crash_mid_run_leaves_no_output(tmp_path, docs, monkeypatch):
    import megasink.data.preprocess as pre

    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    real, calls = pre.process_chunk, []

    def dying(chunk):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle
        return real(chunk)

    monkeypatch.setattr(pre, "process_chunk", dying)
    (tmp_path / "o").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run([src], tmp_path / "o" / "p", chunk_docs=8, valid_fraction=0.2)
    assert os.listdir(tmp_path / "o") == []  # no .idx, no .bin, no temp files


def test_existing_output_needs_overwrite_and_stale_shards_go(tmp_path, docs):
    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    prefix = tmp_path / "o" / "p"
    run([src], prefix, shard_size=1500)
    n_shards = len([f for f in os.listdir(tmp_path / "o") if f.endswith(".idx")])
    assert n_shards >= 3
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run([src], prefix)
    run([src], prefix, overwrite=True)  # unsharded now: the old shards must not linger
    assert sorted(os.listdir(tmp_path / "o")) == ["p.bin", "p.idx", "p.meta.json"]


def test_all_skipped_is_an_error(tmp_path):
    src = data_write_jsonl(tmp_path / "e.jsonl", [b'{"text": " "}\n', b'{"text": ""}\n'])
    with pytest.raises(ValueError, match="no training document was kept.*empty"):
        run([src], tmp_path / "o" / "deeper" / "p")
    assert not (tmp_path / "o").exists()  # no empty output directory either
    (tmp_path / "mine").mkdir()  # a directory that was there before stays
    with pytest.raises(ValueError, match="no training document was kept"):
        run([src], tmp_path / "mine" / "p")
    assert os.listdir(tmp_path / "mine") == []


def test_bad_first_line_is_a_counted_skip_like_any_other(tmp_path, sp, docs):
    good = [json.dumps(r).encode() + b"\n" for r in data_records(docs[:2])]
    for bad in (b'{"text": "caf\xe9 latin-1"}\n', b'{"text": "trunc\n', b"\xff\xfe not json\n"):
        src = data_write_jsonl(tmp_path / "b.jsonl", [bad, good[0], bad, good[1]])
        out = run([src], tmp_path / "o" / "p", overwrite=True)
        assert sequences(tmp_path / "o" / "p") == [sp.encode(d) + [sp.eos_id()] for d in docs[:2]]
        assert out.read == 4 and sum(out.skipped.values()) == 2, out.skipped


def test_file_where_no_line_parses_is_not_jsonl(tmp_path):
    src = data_write_jsonl(tmp_path / "notes.jsonl", [b"plain text\n", b"\xe9t\xe9 latin-1\n", b'"a string"\n'])
    with pytest.raises(InputError, match="notes.jsonl is not JSONL: none of its 3 non-empty lines"):
        run([src], tmp_path / "o" / "p")
    assert not (tmp_path / "o").exists()


def test_cli_command_line(tmp_path, sp, docs):
    src = data_write_parquet(tmp_path / "fineweb.parquet", data_records(docs))
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", src,
        "--tokenizer-model", data_tokenizer_model(), "--output-prefix", str(tmp_path / "o" / "fw"),
        "--text-key", "text", "--workers", "2", "--valid-fraction", "0.1", "--min-int-score", "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr  # the summary line
    assert "doc/s" not in r.stderr  # stderr is not a terminal: no progress bar lines
    for name in ("fw.bin", "fw.idx", "fw_valid.bin", "fw_valid.idx", "fw.meta.json"):
        assert (tmp_path / "o" / name).is_file()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr


def test_killed_worker_is_an_error_not_a_hang(tmp_path):
    """A worker killed by the OS (e.g. out of memory) fails the run cleanly."""
    import multiprocessing
    import signal
    import threading
    import time

    src = data_write_parquet(tmp_path / "in.parquet", data_records(data_documents(3000, seed=5)), row_group_size=500)
    (tmp_path / "o").mkdir()
    errors = []

    def target():
        try:
            run([src], tmp_path / "o" / "p", workers=2, chunk_docs=2)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    deadline = time.time() + 60
    while not multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    victims = multiprocessing.active_children()  # the pool workers this test started
    assert victims, "no worker process seen"
    os.kill(victims[0].pid, signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive(), "preprocess hung after a worker died"
    assert errors and isinstance(errors[0], RuntimeError) and "died" in str(errors[0])
    assert os.listdir(tmp_path / "o") == []


def test_worker_dying_at_start_is_an_error_not_a_hang(tmp_path, docs):
    """Workers that die while starting (here: a script without the __main__ guard, which
    spawn re-imports) end the run with an error. With a tokenizer larger than a pipe buffer
    sent to the workers, the parent used to block forever writing it."""
    import sentencepiece as spm

    symbols = [f"<sym{i:05d}-{'x' * 24}>" for i in range(3000)]
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "big"), vocab_size=3400, model_type="bpe",
        user_defined_symbols=symbols, byte_fallback=True, minloglevel=2, num_threads=1, eos_id=2, bos_id=1,
    )
    assert os.path.getsize(tmp_path / "big.model") > 100_000
    src = data_write_parquet(tmp_path / "in.parquet", data_records(docs))
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from megasink.data.preprocess import PreprocessConfig, preprocess\n"
        f"preprocess(PreprocessConfig(inputs=[{src!r}], tokenizer={str(tmp_path / 'big.model')!r}, "
        f"output_prefix={str(tmp_path / 'o' / 'p')!r}, workers=1, progress=False))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "worker process died unexpectedly" in r.stderr
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []
