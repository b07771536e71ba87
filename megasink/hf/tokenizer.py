"""A model's tokenizer for export, eval and diagnosis: finding it, writing it into an HF directory.

A run's tokenizer (``data.tokenizer``: a sentencepiece ``.model`` or a Hugging Face tokenizer
directory, :mod:`megasink.data.tokenizer`) is copied into every checkpoint (``save_tokenizer``),
and an HF export carries it: a Hugging Face tokenizer as its own files, a sentencepiece model as
the equivalent fast tokenizer (``tokenizer.json`` built from the proto by transformers' own
converter, in the mode that reproduces ``SentencePieceProcessor.encode`` exactly, with no
BOS/EOS added when encoding) plus the ``.model`` itself. ``load_encoder`` frames a document as
the preprocessor did (BOS as the tokenizer does, EOS), so text is encoded as in training.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from megasink.data.tokenizer import copy_tokenizer, load_tokenizer, tokenizer_kind

HF_TOKENIZER_SUBDIR = "hf_tokenizer"  # where an imported checkpoint keeps the source model's HF tokenizer


def _load_proto(spm_path: str | os.PathLike):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    return proto


def special_token_ids(spm_path: str | os.PathLike) -> dict:
    """bos/eos/pad/unk ids of a sentencepiece model (None where the model has none)."""
    spec = _load_proto(spm_path).trainer_spec
    ids = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id,
           "unk_token_id": spec.unk_id}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_hf_tokenizer(spm_path: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int) -> dict:
    """Write tokenizer.json / tokenizer_config.json / tokenizer.model for a sentencepiece model.

    Returns the special token ids. Raises ValueError if the tokenizer has more pieces than the
    model has embedding rows.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _load_proto(spm_path)
    n_pieces = len(proto.pieces)
    if n_pieces > vocab_size:
        raise ValueError(f"tokenizer {spm_path} has {n_pieces} pieces but the model's vocab_size is {vocab_size}")
    if proto.trainer_spec.model_type == 2:  # BPE: vocab as a dict, merges from the piece scores
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif proto.trainer_spec.model_type == 1:  # unigram: (piece, score) list
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        raise ValueError(f"{spm_path}: sentencepiece model type {proto.trainer_spec.model_type} "
                         "is not supported (unigram or bpe)")
    # legacy=True: the dummy-prefix handling that matches SentencePieceProcessor.encode exactly
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    ids = special_token_ids(spm_path)
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    specials = {name.replace("_id", ""): piece[i] for name, i in ids.items() if i is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)
    tok.save_pretrained(str(out_dir))
    shutil.copyfile(spm_path, Path(out_dir) / "tokenizer.model")
    return ids


def write_export_tokenizer(tokenizer: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int) -> dict:
    """Write the tokenizer at ``tokenizer`` into an HF export directory; returns its special token ids.
    Raises ValueError if it has more ids than the model has embedding rows."""
    kind, model = tokenizer_kind(tokenizer)
    if kind == "sentencepiece":
        return write_hf_tokenizer(model, out_dir, vocab_size)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but the model's vocab_size is {vocab_size}")
    copy_tokenizer(tokenizer, out_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def copy_hf_tokenizer(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer of an HF model directory (nothing when it has none); returns the names copied."""
    try:
        return copy_tokenizer(src_dir, out_dir)
    except (OSError, ValueError):  # no tokenizer files in src_dir
        return []


def find_tokenizer(ckpt_dir: Path, data_tokenizer: str = "", explicit: Optional[str] = None) -> Optional[Path]:
    """The tokenizer of a checkpoint: ``explicit`` (--tokenizer), the copy the step dir carries, the HF
    tokenizer an imported checkpoint keeps in ``hf_tokenizer/``, or ``data.tokenizer``; None if none exists.
    A path names a sentencepiece model or a tokenizer directory (``load_tokenizer`` takes either)."""
    if explicit:
        tokenizer_kind(explicit)  # raises, naming the path, if it is no tokenizer
        return Path(explicit)
    candidates = [Path(ckpt_dir), Path(ckpt_dir) / HF_TOKENIZER_SUBDIR]
    candidates += [Path(data_tokenizer)] if data_tokenizer else []
    for candidate in candidates:
        if candidate.exists() and _is_tokenizer(candidate):
            return candidate
    return None


def _is_tokenizer(path: Path) -> bool:
    try:
        tokenizer_kind(path)
    except (OSError, ValueError):
        return False
    return True


def load_encoder(path: str | os.PathLike) -> Callable[[str], list]:
    """text -> token ids of one document, as the preprocessor wrote the training data: the
    tokenizer's BOS first when its own encode adds one (Llama 3), its EOS last (when it has one)."""
    tok = load_tokenizer(path)
    return lambda text: tok.document(text, append_eos=tok.eos_id is not None)


def load_decoder(path: str | os.PathLike) -> Callable[[list], str]:
    """token ids -> text, the inverse of ``load_encoder``: control and special tokens (EOS, BOS) are dropped."""
    return load_tokenizer(path).decode
