"""tools/train_tokenizer.py and megasink.data.tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from data_fixtures import data_documents, data_records, data_write_jsonl, data_write_parquet
from megasink.data.tokenizer import TokenizerConfig, sample_documents, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokin")
    rows = data_records(data_documents(80, seed=2))
    return [data_write_parquet(root / "a.parquet", rows[:50]), data_write_jsonl(root / "b.jsonl.zst", rows[50:])]


def test_cli_writes_model_with_recorded_ids(tmp_path, inputs):
    out = tmp_path / "tok" / "t"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", *inputs,
           "--model-prefix", str(out), "--vocab-size", "400", "--num-threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vocab size 400" in r.stdout and "coverage" in r.stdout and "s\n" in r.stdout
    sp = spm.SentencePieceProcessor(model_file=str(out) + ".model")
    assert sp.get_piece_size() == 400
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    info = json.load(open(str(out) + ".json"))
    assert (info["bos_id"], info["eos_id"], info["pad_id"], info["vocab_size"]) == (1, 2, 3, 400)
    assert info["documents_sampled"] == 80 and 0.9 < info["token_coverage"] <= 1.0
    # byte fallback: characters never seen in training still round-trip exactly
    text = "Unseen: 東京 ✓ Ω\n\ttabs  and  spaces 12345"
    assert sp.decode(sp.encode(text)) == text
    assert sp.piece_to_id("\n") != sp.unk_id()


def test_sample_is_reproducible_and_filtered(inputs):
    a, seen = sample_documents(TokenizerConfig(inputs=inputs, model_prefix="x", max_docs=20, seed=1))
    b, _ = sample_documents(TokenizerConfig(inputs=inputs, model_prefix="x", max_docs=20, seed=1))
    c, _ = sample_documents(TokenizerConfig(inputs=inputs, model_prefix="x", max_docs=20, seed=2))
    assert seen == 80 and len(a) == 20 and a == b and a != c
    hi, seen_hi = sample_documents(TokenizerConfig(inputs=inputs, model_prefix="x", max_docs=100, min_int_score=3))
    assert seen_hi == sum(1 for i in range(80) if i % 6 >= 3) == len(hi)


def test_unigram_and_same_model_twice(tmp_path, inputs):
    models = []
    for name in ("u1", "u2"):
        cfg = TokenizerConfig(inputs=inputs, model_prefix=str(tmp_path / name), vocab_size=500,
                              model_type="unigram", num_threads=1, max_docs=40)
        train_tokenizer(cfg)
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name) + ".model")
        models.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    assert models[0] == models[1]  # (the .model files differ only in the recorded model_prefix)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "u1.model"))
    assert sp.get_piece_size() == 500 and sp.eos_id() == 2


def test_bad_options(tmp_path, inputs):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(TokenizerConfig(inputs=inputs, model_prefix=str(tmp_path / "x"), model_type="wordpiece"))
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TokenizerConfig(inputs=inputs, model_prefix=str(tmp_path / "x"), vocab_size=100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer(TokenizerConfig(inputs=[str(tmp_path / "missing.parquet")], model_prefix=str(tmp_path / "x")))


def _data_import_graph() -> dict:
    """megasink.data module -> the megasink.data modules it imports (at any depth of its code)."""
    import ast
    from pathlib import Path

    import megasink.data

    root = Path(megasink.data.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            deps.update(n.split(".")[2] for n in names if n.startswith("megasink.data."))
        graph[path.stem] = deps - {path.stem}
    return graph


def test_data_modules_import_no_cycle():
    """Tokenizer training and the preprocessor share their record rules through megasink.data.records,
    not through each other (tokenizer.py used preprocess.py's private helpers, which imported tokenizer.py)."""
    graph = _data_import_graph()
    assert {"tokenizer", "preprocess", "records"} <= graph.keys()
    state: dict = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) is None:
            state[module] = "open"
            for dep in sorted(graph.get(module, ())):
                visit(dep, path + [module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "records" in graph["tokenizer"] and "records" in graph["preprocess"]
