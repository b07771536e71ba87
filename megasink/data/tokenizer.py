"""Tokenizers: the one interface every megasink step calls, and sentencepiece training.

A tokenizer is a path (``--tokenizer`` of preprocessing, export and eval; ``data.tokenizer``):

- a sentencepiece ``.model`` file, or a directory holding ``tokenizer.model`` and no
  ``tokenizer.json`` (a checkpoint of a sentencepiece run);
- a Hugging Face tokenizer directory: ``tokenizer.json`` with its ``tokenizer_config.json``
  (and ``special_tokens_map.json``, ``added_tokens.json``, a chat template when present), loaded
  with transformers' ``AutoTokenizer`` from local files only, never running the directory's
  own code, and only when the result is a fast (Rust ``tokenizers``) tokenizer.

``load_tokenizer(path)`` gives a :class:`Tokenizer` whatever the kind: ``encode_batch`` /
``encode`` (text to ids, never adding the tokenizer's own special tokens), ``decode`` (special
tokens dropped), ``document`` (the ids of one training document), the special ids,
``vocab_size`` (largest id + 1) and ``info()`` (what ``meta.json`` records).

Identity, ``tokenizer_sha256(path)``, computed from the files without loading them (training
checks it cheaply): a sentencepiece model's is the sha256 of its bytes; a Hugging Face
tokenizer's is the sha256 of the lines ``NAME SHA256`` of its files (``HF_TOKENIZER_FILES``
present, in that order). The same files give the same identity wherever they lie, so a
checkpoint's copy (``copy_tokenizer``) or an export matches the data it was trained on.

Documents (``Tokenizer.framing``, used by the preprocessor and by ``document``): the text is
encoded without the tokenizer's own special tokens, then framed: its BOS first when the
tokenizer's own encode puts it there (Llama 3's ``<|begin_of_text|>``; sentencepiece models
and Qwen's tokenizers add none) or when asked (``--prepend-bos`` / ``--no-bos``), its EOS last
(Megatron's ``--append-eod``). Without a BOS (Qwen defines only ``<|endoftext|>``) a document
is ``text <eos>``: the previous document's EOS is the only separator in the token stream, and
document masking starts every document afresh. Text that spells a special token (a web page
quoting ``<|end_of_text|>``) is encoded as the tokenizer's own encode does: as that token,
unless the tokenizer's config sets ``split_special_tokens``.

Training (``train_tokenizer``, behind tools/train_tokenizer.py): documents are read exactly as
the preprocessor reads them (same sources, text key and filters), and up to ``max_docs`` of
them are sampled reproducibly (reservoir sampling with a seeded generator, so the sample
depends only on the inputs, the filters and the seed). Defaults follow the Llama recipe: BPE
(``model_type="unigram"`` on request), byte fallback (no unknown characters), digits split,
text kept as is (identity normalisation, whitespace preserved). Ids: unk 0, bos 1, eos 2,
pad 3; the newline is a piece of its own (id 4). Each document is fed to the trainer line by
line, so long documents are not dropped by sentencepiece's sentence-length limit. Besides
``PREFIX.model`` and ``PREFIX.vocab``, a ``PREFIX.json`` records the special ids, the options
and the measured coverage.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from megasink.data.records import RecordFilter, keep_text, record_fields
from megasink.data.sources import ReadOptions, check_source, expand_inputs, iter_chunks
from megasink.errors import UserError

KINDS = ("sentencepiece", "huggingface")
SPM_FILE = "tokenizer.model"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
"""The files that define a Hugging Face tokenizer: hashed for its identity, copied with it."""
_PROBE_TEXT = "Hello"  # encoded with and without special tokens to see whether the tokenizer adds its BOS


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be used as given (names the path and what to pass instead)."""


# --------------------------------------------------------------------------- identity and files


def tokenizer_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, the file or directory that holds it): sentencepiece -> its ``.model`` file,
    huggingface -> its directory."""
    p = Path(path)
    if p.is_file():
        return "sentencepiece", p
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return "huggingface", p
        if (p / SPM_FILE).is_file():
            return "sentencepiece", p / SPM_FILE
        raise TokenizerError(
            f"tokenizer {path}: the directory holds neither tokenizer.json (a Hugging Face tokenizer) nor "
            f"{SPM_FILE} (sentencepiece); pass a sentencepiece .model file or a directory written by a Hugging "
            "Face tokenizer's save_pretrained"
        )
    raise FileNotFoundError(
        f"tokenizer {path} does not exist: pass a sentencepiece .model file (train one with "
        "tools/train_tokenizer.py) or a Hugging Face tokenizer directory (with tokenizer.json)"
    )


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The files that define the tokenizer at ``path`` (hashed for its identity, copied with it)."""
    kind, p = tokenizer_kind(path)
    if kind == "sentencepiece":
        return [p]
    return [p / name for name in HF_TOKENIZER_FILES if (p / name).is_file()]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(path: str | os.PathLike) -> tuple[str, dict]:
    """(sha256 of the tokenizer, {file name: its sha256})."""
    kind, _ = tokenizer_kind(path)
    files = {f.name: _file_sha256(f) for f in tokenizer_files(path)}
    if kind == "sentencepiece":
        return next(iter(files.values())), files
    lines = "".join(f"{name} {digest}\n" for name, digest in files.items())
    return hashlib.sha256(lines.encode()).hexdigest(), files


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """The identity of the tokenizer at ``path`` (see the module docstring), without loading it."""
    return _identity(path)[0]


def copy_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer at ``path`` into ``out_dir`` (a sentencepiece model as ``tokenizer.model``,
    a Hugging Face tokenizer as its files); ``out_dir`` is then a tokenizer path of the same identity.
    Returns the names written."""
    kind, _ = tokenizer_kind(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tokenizer_files(path):
        name = SPM_FILE if kind == "sentencepiece" else f.name
        shutil.copyfile(f, out / name)
        written.append(name)
    return written


# --------------------------------------------------------------------------- the interface


class Tokenizer:
    """A loaded tokenizer, sentencepiece or Hugging Face (build it with ``load_tokenizer``).

    Special ids are None where the tokenizer defines no such token; ``adds_bos``: its own encode
    puts its BOS first (the default of ``framing``)."""

    kind: str = ""
    path: str
    sha256: str
    files: dict
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]
    adds_bos: bool
    class_name: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without the tokenizer's own special tokens."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, ...) are dropped."""
        raise NotImplementedError

    def worker_spec(self, tmp_dir: str) -> tuple:
        """What a preprocessing worker needs to encode as this tokenizer (``open_worker_encoder``):
        a few strings only, because a spawn payload larger than a pipe buffer deadlocks the parent
        when a worker dies while starting."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without the tokenizer's own special tokens."""
        return self.encode_batch([text])[0]

    def framing(self, prepend_bos: Optional[bool] = None,
                append_eos: bool = True) -> tuple[Optional[int], Optional[int]]:
        """(id put before each document or None, id put after it or None). ``prepend_bos`` None:
        as the tokenizer's own encode does (``adds_bos``). Asking for a token it lacks is an error."""
        bos = self.adds_bos if prepend_bos is None else prepend_bos
        for wanted, token_id, name, flag in ((bos, self.bos_id, "BOS", "drop --prepend-bos"),
                                             (append_eos, self.eos_id, "EOS", "pass --no-eos")):
            if wanted and token_id is None:
                fix = (f"retrain it with a {name.lower()}_id" if self.kind == "sentencepiece"
                       else f"set \"{name.lower()}_token\" in its tokenizer_config.json")
                raise TokenizerError(f"tokenizer {self.path} defines no {name} token: {fix}, or {flag}")
        return (self.bos_id if bos else None), (self.eos_id if append_eos else None)

    def document(self, text: str, prepend_bos: Optional[bool] = None, append_eos: bool = True) -> list[int]:
        """The ids of ``text`` as one training document (framed as the preprocessor frames it)."""
        bos, eos = self.framing(prepend_bos, append_eos)
        return ([] if bos is None else [bos]) + self.encode(text) + ([] if eos is None else [eos])

    def info(self) -> dict:
        """What a preprocessed corpus's meta.json records of its tokenizer."""
        out = {"kind": self.kind, "model": self.path, "sha256": self.sha256, "files": self.files,
               "vocab_size": self.vocab_size, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
               "pad_id": self.pad_id, "adds_bos": self.adds_bos}
        if self.kind == "huggingface":
            out["class"] = self.class_name
        return out

    def _identify(self, kind: str, path: str) -> None:
        self.kind, self.path = kind, str(path)
        self.sha256, self.files = _identity(path)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        _, model = tokenizer_kind(path)
        proto = model.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            raise TokenizerError(f"{model} is not a sentencepiece model ({e}); pass a sentencepiece .model file "
                                 "or a Hugging Face tokenizer directory") from e
        self._identify("sentencepiece", str(path))
        self._model = str(model)
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self.adds_bos = False  # SentencePieceProcessor.encode adds nothing unless asked
        self.class_name = "SentencePieceProcessor"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def worker_spec(self, tmp_dir: str) -> tuple:
        return ("sentencepiece", self._model, self.sha256, False)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, loaded with ``AutoTokenizer`` (fast only, no remote code)."""

    def __init__(self, path: str | os.PathLike):
        self._identify("huggingface", str(path))
        tok = auto_tokenizer(Path(path))
        self._tok, self._backend = tok, tok.backend_tokenizer
        self._split_special = bool(getattr(tok, "split_special_tokens", False))
        _plain_backend(self._backend, self._split_special)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        token_id = lambda token: vocab.get(str(token)) if token else None  # noqa: E731
        self.bos_id, self.eos_id = token_id(tok.bos_token), token_id(tok.eos_token)
        self.pad_id, self.unk_id = token_id(tok.pad_token), token_id(tok.unk_token)
        with_specials = list(tok(_PROBE_TEXT)["input_ids"])  # the tokenizer's own encode
        plain = self.encode(_PROBE_TEXT)
        self.adds_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id] and plain[:1] != [self.bos_id]
        self.class_name = type(tok).__name__

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _backend_encode(self._backend, texts)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def worker_spec(self, tmp_dir: str) -> tuple:
        """The backend as loaded (after AutoTokenizer's adjustments), serialised to ``tmp_dir``:
        workers load it with ``tokenizers`` alone, without importing transformers."""
        path = os.path.join(tmp_dir, "backend-tokenizer.json")
        self._backend.save(path)
        return ("tokenizers", path, _file_sha256(Path(path)), self._split_special)


def auto_tokenizer(path: Path):
    """transformers' AutoTokenizer on local files, never running the directory's code; fast only."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise TokenizerError(f"tokenizer {path} is a Hugging Face tokenizer directory: install transformers "
                             "(pip install -e '.[hf]')") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises ValueError / OSError / KeyError for unusable directories
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise TokenizerError(f"tokenizer {path}: transformers' AutoTokenizer cannot load it from local files without "
                             f"running the directory's own code ({why})") from e
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizerError(f"tokenizer {path}: AutoTokenizer gave {type(tok).__name__}, not a fast tokenizer; "
                             "megasink needs tokenizer.json (save a fast tokenizer with save_pretrained)")
    return tok


def _plain_backend(backend, split_special_tokens: bool) -> None:
    """A ``tokenizers.Tokenizer`` set as transformers sets it to encode unpadded, untruncated text."""
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens


def _backend_encode(backend, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at ``path`` (a sentencepiece .model, or a directory: see the module docstring)."""
    kind, _ = tokenizer_kind(path)
    return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


def tokenizer_info(path: str | os.PathLike) -> dict:
    """Identity and special ids of the tokenizer at ``path`` (recorded in preprocessed meta.json)."""
    return load_tokenizer(path).info()


def open_worker_encoder(spec: tuple) -> Callable[[list[str]], list[list[int]]]:
    """``encode_batch`` of the tokenizer behind ``Tokenizer.worker_spec``, in a worker process; the
    file must still be the one the spec was made from."""
    kind, path, sha256, split_special = spec
    if _file_sha256(Path(path)) != sha256:
        raise RuntimeError(f"tokenizer {path} changed while preprocessing")
    if kind == "sentencepiece":
        sp = SentencePieceTokenizer(path)
        return sp.encode_batch
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(path)
    _plain_backend(backend, split_special)
    return lambda texts: _backend_encode(backend, texts)


# --------------------------------------------------------------------------- sentencepiece training

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
