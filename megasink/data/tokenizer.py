"""Train a sentencepiece tokenizer on the preprocessor's inputs (library behind tools/train_tokenizer.py).

Documents are read exactly as the preprocessor reads them (same sources, text key and
filters), and up to ``max_docs`` of them are sampled reproducibly (reservoir sampling with
a seeded generator, so the sample depends only on the inputs, the filters and the seed).

Defaults follow the Llama recipe: BPE (``model_type="unigram"`` on request), byte
fallback (no unknown characters), digits split, text kept as is (identity
normalisation, whitespace preserved). Ids: unk 0, bos 1, eos 2, pad 3; the newline is a
piece of its own (id 4). Each document is fed to the trainer line by line, so long
documents are not dropped by sentencepiece's sentence-length limit.

Besides ``PREFIX.model`` and ``PREFIX.vocab``, a ``PREFIX.json`` records the special ids,
the options and the measured coverage.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from megasink.data.records import RecordFilter, keep_text, record_fields
from megasink.data.sources import ReadOptions, check_source, expand_inputs, iter_chunks

MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TokenizerConfig:
    """Options of one tokenizer training run."""

    inputs: list
    """Files, directories or globs, as for the preprocessor."""
    model_prefix: str
    """Writes MODEL_PREFIX.model, .vocab and .json."""
    vocab_size: int = 32000
    """Vocabulary size, special and byte-fallback pieces included."""
    model_type: str = "bpe"
    """bpe | unigram."""
    max_docs: int = 100_000
    """Documents sampled for training (reservoir sample over all inputs)."""
    seed: int = 1234
    """Seed of the document sample."""
    text_key: str = "text"
    """Column / JSON key holding the text."""
    min_int_score: Optional[int] = None
    """Only sample documents with int_score >= this (as the preprocessor filter)."""
    character_coverage: float = 0.9999
    """sentencepiece character_coverage: rarer characters go through byte fallback."""
    max_sentence_length: int = 16384
    """Longest training line in bytes (longer lines are skipped by sentencepiece)."""
    num_threads: int = 0
    """Trainer threads; 0: all CPUs."""
    split: str = "train"
    """Split to read from a datasets DatasetDict folder."""


def tokenizer_info(model_path: str) -> dict:
    """Identity and special ids of a sentencepiece model (recorded in preprocessed meta.json)."""
    import sentencepiece as spm

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer model {model_path} does not exist (train one with tools/train_tokenizer.py)")
    with open(model_path, "rb") as f:
        proto = f.read()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:
        raise ValueError(f"{model_path} is not a sentencepiece model: {e}") from e
    return {
        "model": str(model_path),
        "sha256": hashlib.sha256(proto).hexdigest(),
        "vocab_size": sp.get_piece_size(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
    }


def _decoded_texts(cfg: TokenizerConfig) -> Iterator[str]:
    """Every text the preprocessor would keep (before tokenization), in input order."""
    sources = expand_inputs(cfg.inputs)
    opts = ReadOptions(text_key=cfg.text_key, need_int_score=cfg.min_int_score is not None, split=cfg.split)
    for s in sources:
        check_source(s, opts)
    filt = RecordFilter(cfg.text_key, cfg.min_int_score)
    skipped: Counter = Counter()
    for chunk in iter_chunks(sources, opts):
        chunk = chunk.as_lists()
        for i in range(len(chunk.records)):
            fields = record_fields(chunk, i, cfg.text_key, skipped)
            if fields is not None and keep_text(*fields, filt, skipped) is not None:
                yield fields[0]


def sample_documents(cfg: TokenizerConfig) -> tuple[list[str], int]:
    """Reservoir sample of up to ``cfg.max_docs`` documents and the number seen."""
    rng = random.Random(cfg.seed)
    reservoir: list[str] = []
    seen = 0
    for text in _decoded_texts(cfg):
        if len(reservoir) < cfg.max_docs:
            reservoir.append(text)
        else:
            j = rng.randrange(seen + 1)
            if j < cfg.max_docs:
                reservoir[j] = text
        seen += 1
    return reservoir, seen


def _lines(docs: list[str]) -> Iterator[str]:
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def measure_coverage(model_path: str, docs: list[str]) -> dict:
    """Share of tokens that are ordinary pieces (not byte fallback, not unk), and chars/token."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    total = fallback = chars = 0
    for doc in docs:
        ids = sp.encode(doc)
        total += len(ids)
        chars += len(doc)
        fallback += sum(1 for t in ids if sp.is_byte(t) or sp.is_unknown(t))
    return {
        "token_coverage": 1.0 - fallback / max(total, 1),
        "chars_per_token": chars / max(total, 1),
    }


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Train and write ``cfg.model_prefix``.{model,vocab,json}; returns the recorded summary."""
    import sentencepiece as spm

    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={cfg.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if cfg.vocab_size < 260:
        raise ValueError(f"vocab_size={cfg.vocab_size} is too small: byte fallback alone needs 256 pieces + 4 specials")
    start = time.perf_counter()
    docs, seen = sample_documents(cfg)
    if not docs:
        raise ValueError(f"no usable document in {cfg.inputs} (all empty, invalid or filtered out)")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(docs),
        model_prefix=cfg.model_prefix,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        byte_fallback=True,
        user_defined_symbols=["\n"],
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=cfg.character_coverage,
        max_sentence_length=cfg.max_sentence_length,
        input_sentence_size=0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=cfg.num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    summary = tokenizer_info(cfg.model_prefix + ".model")
    summary.update(measure_coverage(cfg.model_prefix + ".model", docs[:1000]))
    summary.update(documents_seen=seen, documents_sampled=len(docs), options=asdict(cfg))
    summary["seconds"] = round(time.perf_counter() - start, 3)
    from megasink.utils import atomic_write_json

    atomic_write_json(cfg.model_prefix + ".json", summary)
    return summary
