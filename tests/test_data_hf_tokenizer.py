"""Hugging Face tokenizer directories through preprocessing, training's identity check, checkpoints
and export (megasink.data.tokenizer, megasink.hf.tokenizer).

References: byte-level BPE tokenizers trained here with the ``tokenizers`` library (Llama 3 style with
``<|begin_of_text|>`` added by the post-processor, Qwen style with only ``<|endoftext|>``, and one with
ids above 65535), encoded by ``tokenizers`` itself (``Tokenizer.from_file(tokenizer.json)``, its own
special tokens included) and by transformers' ``AutoTokenizer``; Megatron's IndexedDataset for the
shards; numpy views of the files for the layout.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import data_documents, data_hf_tokenizer, data_records, data_tokenizer_model, data_write_parquet
from megasink.config import DataConfig
from megasink.data import build_dataset
from megasink.data.indexed import IndexedDataset
from megasink.data.preprocess import PreprocessConfig, preprocess
from megasink.data.tokenizer import (TokenizerError, copy_tokenizer, load_tokenizer, tokenizer_kind,
                                     tokenizer_sha256)
from megasink.errors import DataError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 60
# special-token text inside a document, a lone-surrogate-free mix of scripts, digits and whitespace runs
EXTRA_DOCS = ["quoting <|end_of_text|> and <|endoftext|> inside a page", "東京 ✓ Ω 12345678  \t\n\n  spaces",
              "x" * 3000]


@pytest.fixture(scope="module")
def docs():
    return data_documents(N_DOCS, seed=4) + EXTRA_DOCS


@pytest.fixture(scope="module")
def src(tmp_path_factory, docs):
    return data_write_parquet(tmp_path_factory.mktemp("hfin") / "in.parquet", data_records(docs))


def run(src, prefix, tokenizer, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("chunk_docs", 16)
    return preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tokenizer), output_prefix=str(prefix), **kw))


def reference(tok_dir, texts) -> list[list[int]]:
    """The tokenizer's own encode (its special tokens included) + its EOS, from tokenizers alone."""
    raw = tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    eos = raw.token_to_id(json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))["eos_token"])
    return [raw.encode(t).ids + [eos] for t in texts]


def sequences(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("style,dtype", [("llama3", np.uint16), ("qwen", np.uint16), ("llama3_large", np.int32)])
def test_round_trip_equals_the_tokenizers_own_encode(tmp_path, src, docs, style, dtype):
    tok_dir = data_hf_tokenizer(style)
    run(src, tmp_path / "p", tok_dir)
    expected = reference(tok_dir, docs)
    assert sequences(tmp_path / "p") == expected
    auto = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert [list(ids) + [auto.eos_token_id] for ids in auto(docs)["input_ids"]] == expected
    first = [seq[0] for seq in expected]
    if style == "qwen":  # no BOS: a document is its text + EOS
        assert auto.bos_token_id is None and auto.eos_token_id not in first
    else:
        assert set(first) == {auto.bos_token_id}
    assert IndexedDataset(str(tmp_path / "p")).dtype == dtype
    if style == "llama3_large":
        assert max(max(s) for s in expected) > 65535 > min(min(s) for s in expected)
    meta = json.load(open(tmp_path / "p.meta.json"))
    tok = meta["tokenizer"]
    assert tok["kind"] == "huggingface" and tok["vocab_size"] == len(auto) and meta["dtype"] == np.dtype(dtype).name
    assert set(tok["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    assert tok["sha256"] == tokenizer_sha256(tok_dir)
    assert (tok["bos_id"], tok["eos_id"]) == (auto.bos_token_id, auto.eos_token_id)
    assert meta["options"]["prepend_bos"] == (style != "qwen")


def test_same_bytes_for_any_worker_count(tmp_path, src):
    tok_dir = data_hf_tokenizer("llama3_large")
    outs = {}
    for workers in (0, 1, 2):
        prefix = tmp_path / f"w{workers}" / "p"
        res = run(src, prefix, tok_dir, workers=workers, chunk_docs=7, valid_fraction=0.2, shard_size=4000)
        outs[workers] = sorted(res.outputs)
    names = [os.path.basename(p) for p in outs[0]]
    assert "p_00001.bin" in names and "p_valid.bin" in names and "p.meta.json" in names
    for workers in (1, 2):
        assert [os.path.basename(p) for p in outs[workers]] == names
        for a, b in zip(outs[0], outs[workers]):
            assert filecmp.cmp(a, b, shallow=False), (a, b)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_megatron_reads_the_int32_shards(tmp_path, src, docs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    tok_dir = data_hf_tokenizer("llama3_large")
    run(src, tmp_path / "p", tok_dir)
    theirs = mi.IndexedDataset(str(tmp_path / "p"))
    assert theirs.index.dtype == np.int32
    assert [theirs[i].tolist() for i in range(len(docs))] == reference(tok_dir, docs)


def test_framing_options_and_missing_special_tokens(tmp_path, src, docs):
    llama, qwen = data_hf_tokenizer("llama3"), data_hf_tokenizer("qwen")
    run(src, tmp_path / "nobos", llama, prepend_bos=False)
    assert sequences(tmp_path / "nobos") == [ids[1:] for ids in reference(llama, docs)]
    run(src, tmp_path / "noeos", llama, append_eos=False)
    assert sequences(tmp_path / "noeos") == [ids[:-1] for ids in reference(llama, docs)]
    with pytest.raises(TokenizerError, match="defines no BOS token.*drop --prepend-bos"):
        run(src, tmp_path / "x", qwen, prepend_bos=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(qwen, "tokenizer.json"), bare)  # no tokenizer_config.json: no EOS defined
    with pytest.raises(TokenizerError, match="defines no EOS token.*--no-eos"):
        run(src, tmp_path / "x", bare)
    assert not (tmp_path / "x").exists()
    run(src, tmp_path / "bare_out", bare, append_eos=False)
    assert sequences(tmp_path / "bare_out") == [ids[:-1] for ids in reference(qwen, docs)]


def test_cli_takes_a_tokenizer_directory(tmp_path, src, docs):
    tok_dir = data_hf_tokenizer("llama3")
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", src, "--tokenizer", tok_dir,
           "--output-prefix", str(tmp_path / "o" / "p"), "--workers", "2", "--no-bos"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert sequences(tmp_path / "o" / "p") == [ids[1:] for ids in reference(tok_dir, docs)]
    r = subprocess.run(cmd[:5] + [str(tmp_path)] + cmd[6:] + ["--overwrite"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 2 and "neither tokenizer.json" in r.stderr and "\n" not in r.stderr.strip()


def test_identity_is_the_files_wherever_they_lie_and_training_checks_it(tmp_path, src):
    tok_dir = data_hf_tokenizer("llama3")
    run(src, tmp_path / "p", tok_dir)
    copy = tmp_path / "copy"
    assert copy_tokenizer(tok_dir, copy) == ["tokenizer.json", "tokenizer_config.json"]
    step = tmp_path / "step_1"
    step.mkdir()
    from megasink.checkpoint import save_tokenizer

    save_tokenizer(tok_dir, step)
    assert tokenizer_sha256(copy) == tokenizer_sha256(step) == tokenizer_sha256(tok_dir)
    for tokenizer in (tok_dir, str(copy), str(step)):
        build_dataset(DataConfig(path=[str(tmp_path / "p")], tokenizer=tokenizer), 32, 1024, 0)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|begin_of_text|>"}))
    with pytest.raises(DataError, match=r"tokenized with .* not with data.tokenizer=.*copy.*--tokenizer"):
        build_dataset(DataConfig(path=[str(tmp_path / "p")], tokenizer=str(copy)), 32, 1024, 0)
    with pytest.raises(DataError, match="not with data.tokenizer"):  # another kind of tokenizer altogether
        build_dataset(DataConfig(path=[str(tmp_path / "p")], tokenizer=data_tokenizer_model()), 32, 1024, 0)
    with pytest.raises(DataError, match="data.tokenizer: tokenizer .*nowhere does not exist"):
        build_dataset(DataConfig(path=[str(tmp_path / "p")], tokenizer=str(tmp_path / "nowhere")), 32, 1024, 0)
    with pytest.raises(DataError, match="vocabulary of 1002"):
        build_dataset(DataConfig(path=[str(tmp_path / "p")], tokenizer=tok_dir), 32, 1000, 0)
    with pytest.raises(DataError, match="data.tokenizer: tokenizer .* holds neither tokenizer.json"):
        build_dataset(DataConfig(path=["synthetic"], tokenizer=str(tmp_path)), 32, 1024, 0)  # before any save fails


def test_kinds_and_refusals(tmp_path):
    spm_model = data_tokenizer_model()
    holder = tmp_path / "spm_dir"
    copy_tokenizer(spm_model, holder)  # a checkpoint of a sentencepiece run holds tokenizer.model
    assert tokenizer_kind(holder) == ("sentencepiece", holder / "tokenizer.model")
    assert tokenizer_sha256(holder) == tokenizer_sha256(spm_model) == load_tokenizer(spm_model).sha256
    with pytest.raises(TokenizerError, match="neither tokenizer.json .* nor tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist: pass a sentencepiece .model"):
        load_tokenizer(tmp_path / "missing")
    remote = tmp_path / "remote"
    shutil.copytree(data_hf_tokenizer("llama3"), remote)
    marker = tmp_path / "remote_code_ran"
    (remote / "tokenization_x.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast\n"
        "class XTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_x.XTokenizer"]})
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="without running the directory's own code"):
        load_tokenizer(remote)
    assert not marker.exists()


def test_decode_and_document_match_transformers(docs):
    for style in ("llama3", "qwen", "llama3_large"):
        tok_dir = data_hf_tokenizer(style)
        tok, auto = load_tokenizer(tok_dir), transformers.AutoTokenizer.from_pretrained(tok_dir)
        assert tok.encode_batch(docs) == auto(docs, add_special_tokens=False)["input_ids"]
        assert [tok.document(d) for d in docs] == reference(tok_dir, docs)
        for d in docs:
            ids = tok.document(d)
            assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True)
            assert tok.decode(ids) == d or d == EXTRA_DOCS[0]
        # text spelling a special token is that token, as in the tokenizer's own encode (then dropped by decode)
        assert tok.eos_id in tok.encode(EXTRA_DOCS[0])


def test_checkpoint_and_export_carry_the_tokenizer(tmp_path, docs):
    """A checkpoint of a run with an HF tokenizer carries its files; the export carries them too, and
    the exported model's config names its BOS/EOS; eval's encoder reads it from the checkpoint."""
    from conftest import build_seeded, small_model_cfg
    from megasink.checkpoint import save_model_checkpoint
    from megasink.config import Config
    from megasink.hf.export import convert_checkpoint
    from megasink.hf.tokenizer import find_tokenizer, load_decoder, load_encoder

    tok_dir = data_hf_tokenizer("llama3")
    cfg = Config(model=small_model_cfg("sink", vocab_size=1024), data=DataConfig(tokenizer=tok_dir))
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1", tokenizer=tok_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(ckpt / name, Path(tok_dir) / name, shallow=False)
    assert find_tokenizer(ckpt, "") == ckpt
    assert load_encoder(ckpt)(docs[0]) == reference(tok_dir, docs[:1])[0]
    assert load_decoder(ckpt)(load_encoder(ckpt)(docs[0])) == docs[0]
    out = convert_checkpoint(ckpt, tmp_path / "hf", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(out / name, Path(tok_dir) / name, shallow=False)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (1000, 1001)
    assert tokenizer_sha256(out) == tokenizer_sha256(tok_dir)
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    assert exported(docs)["input_ids"] == transformers.AutoTokenizer.from_pretrained(tok_dir)(docs)["input_ids"]
    assert load_encoder(out)(docs[0]) == load_encoder(tok_dir)(docs[0])  # the export is a tokenizer path too
    small = Config(model=small_model_cfg("vanilla", vocab_size=512))
    ckpt2 = save_model_checkpoint(build_seeded(small.model), small, tmp_path / "small", tokenizer=tok_dir)
    with pytest.raises(ValueError, match="1002 ids but the model's vocab_size is 512"):
        convert_checkpoint(ckpt2, tmp_path / "hf2", progress=False)


def test_sentencepiece_export_encodes_as_the_model(tmp_path, docs):
    """load_encoder frames a document the same way for a sentencepiece model and for its HF export."""
    from conftest import build_seeded, small_model_cfg
    from megasink.checkpoint import save_model_checkpoint
    from megasink.config import Config
    from megasink.hf.export import convert_checkpoint
    from megasink.hf.tokenizer import load_encoder

    spm_model = data_tokenizer_model()
    cfg = Config(model=small_model_cfg("vanilla", vocab_size=512))
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1", tokenizer=spm_model)
    assert (ckpt / "tokenizer.model").is_file() and not (ckpt / "tokenizer.json").exists()
    out = convert_checkpoint(ckpt, tmp_path / "hf", progress=False)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    for encode in (load_encoder(spm_model), load_encoder(ckpt), load_encoder(out)):
        assert [encode(d) for d in docs] == [sp.encode(d) + [sp.eos_id()] for d in docs]



def test_a_worker_imports_neither_torch_nor_transformers(tmp_path):
    """A preprocessing worker loads only what it encodes with: torch or transformers would add seconds
    to every worker's start (spawn), which counts against the throughput per worker."""
    tok = load_tokenizer(data_hf_tokenizer("llama3"))
    code = ("import sys\nfrom megasink.data.preprocess import _init_worker, _WORKER\n"
            f"_init_worker({tok.worker_spec(str(tmp_path))!r}, None)\nprint(_WORKER['encode'](['Hello world']))\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    encoded, imported = r.stdout.strip().splitlines()
    assert encoded == str(tok.encode_batch(["Hello world"]))
    assert imported == "[]", f"a preprocessing worker imported {imported}"
