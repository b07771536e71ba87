"""Helpers for the data tests: FineWeb-Edu-shaped inputs and a tiny sentencepiece model.

Inputs are written here with pyarrow / json directly (not through megasink), in the schema
FineWeb-Edu publishes: text, id, dump, url, file_path, language, language_score,
token_count, score, int_score. The tokenizer is trained once per test process from
standard-library docstrings (no download) and cached in a temporary directory.
"""
from __future__ import annotations

import ast
import functools
import gzip
import json
import os
import random
import sysconfig
import tempfile

FINEWEB_EDU_COLUMNS = [
    "text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score", "int_score",
]
_MODULES = ["textwrap", "json/__init__", "argparse", "collections/__init__", "functools", "random", "string", "csv"]


@functools.lru_cache(maxsize=None)
def data_docstring_corpus() -> tuple:
    """Docstrings of a few standard-library modules (a few hundred English paragraphs)."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for mod in _MODULES:
        with open(os.path.join(root, mod + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 60:
                    docs.append(doc)
    return tuple(docs)


def data_documents(n: int, seed: int = 0) -> list[str]:
    """n varied documents built from the docstring corpus (some multi-line, some non-ASCII)."""
    corpus = data_docstring_corpus()
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = rng.sample(corpus, k=rng.randint(1, 3))
        text = "\n\n".join(parts)
        if i % 7 == 3:
            text += " Café, naïve — 東京 ✓"
        docs.append(text)
    return docs


def data_records(docs: list[str], int_scores=None) -> list[dict]:
    """FineWeb-Edu rows for ``docs``; int_score cycles 0..5 unless given."""
    rows = []
    for i, text in enumerate(docs):
        s = int_scores[i] if int_scores is not None else i % 6
        rows.append({
            "text": text, "id": f"<urn:uuid:{i:08x}-0000-4000-8000-000000000000>", "dump": "CC-MAIN-2024-18",
            "url": f"http://example.com/{i}", "file_path": "s3://commoncrawl/crawl-data/x.warc.gz",
            "language": "en", "language_score": 0.9, "token_count": len(text.split()), "score": s + 0.4,
            "int_score": s,
        })
    return rows


def data_write_parquet(path, rows: list[dict], text_type=None, row_group_size: int = 50) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: [r[c] for r in rows] for c in rows[0]} if rows else {c: [] for c in FINEWEB_EDU_COLUMNS}
    arrays = {}
    for c, values in columns.items():
        if c == "text" and text_type is not None:
            arrays[c] = pa.array(values, type=text_type)
        else:
            arrays[c] = pa.array(values)
    pq.write_table(pa.table(arrays), str(path), row_group_size=row_group_size)
    return str(path)


def data_write_jsonl(path, rows: list[dict]) -> str:
    """JSON lines; compressed by the suffix (.gz, .zst). Rows may be pre-encoded bytes lines."""
    lines = [r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows]
    payload = b"".join(lines)
    path = str(path)
    if path.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    elif path.endswith(".zst"):
        import zstandard

        payload = zstandard.ZstdCompressor().compress(payload)
    with open(path, "wb") as f:
        f.write(payload)
    return path


@functools.lru_cache(maxsize=None)
def data_tokenizer_model() -> str:
    """Path of a tiny BPE sentencepiece model (vocab 512, byte fallback, eos=2), trained once."""
    import sentencepiece as spm

    out = tempfile.mkdtemp(prefix="megasink-data-tok-")
    lines = [line for doc in data_docstring_corpus() for line in doc.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(out, "tok"), vocab_size=512, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    return os.path.join(out, "tok.model")


# --------------------------------------------------------------------------- Hugging Face tokenizers

# Llama 3's pre-tokenizer split (then byte-level); see its tokenizer.json
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
HF_TOKENIZER_STYLES = ("llama3", "qwen", "llama3_large")
"""llama3: BOS added by the post-processor, specials after the vocabulary; qwen: EOS only, no BOS;
llama3_large: llama3 with every learned id moved up by 65,000 (ids up to ~66,000: stored as int32)."""


@functools.lru_cache(maxsize=None)
def data_hf_tokenizer(style: str = "llama3") -> str:
    """Directory of a byte-level BPE Hugging Face tokenizer (vocab 1000 + specials) trained on the
    docstring corpus, once per test process (``write_hf_bpe_tokenizer``)."""
    return write_hf_bpe_tokenizer(tempfile.mkdtemp(prefix=f"megasink-hf-tok-{style}-"), data_docstring_corpus(),
                                  1000, style)


def write_hf_bpe_tokenizer(out: str, texts, vocab_size: int, style: str = "llama3") -> str:
    """Train a byte-level BPE with the ``tokenizers`` library on ``texts`` and write it to ``out`` as the
    model hubs ship one: tokenizer.json from ``tokenizers`` and a hand-written tokenizer_config.json.
    ``style``: one of HF_TOKENIZER_STYLES. Returns ``out``."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    if style not in HF_TOKENIZER_STYLES:
        raise ValueError(f"style {style!r} is not one of {HF_TOKENIZER_STYLES}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if style == "llama3_large":
        tok = _shift_ids(tok, 65_000)
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if style != "qwen" else (None, "<|endoftext|>")
    tok.add_special_tokens([t for t in (bos, eos) if t])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "clean_up_tokenization_spaces": False, "model_max_length": 131072}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out


def _shift_ids(tok, shift: int):
    """The same BPE with every id moved up by ``shift`` (unused filler entries below)."""
    import tokenizers
    from tokenizers import models

    spec = json.loads(tok.to_str())
    vocab = {f"<|filler_{i}|>": i for i in range(shift)}
    vocab.update({piece: shift + i for piece, i in spec["model"]["vocab"].items()})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    shifted = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    shifted.pre_tokenizer, shifted.decoder = tok.pre_tokenizer, tok.decoder
    return shifted
