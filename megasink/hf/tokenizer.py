"""sentencepiece <-> Hugging Face tokenizer files, and finding a model's tokenizer.

megasink trains with a sentencepiece ``.model``; an HF export carries the equivalent fast
tokenizer (``tokenizer.json`` built from the sentencepiece proto by transformers' own
converter, in the mode that reproduces ``SentencePieceProcessor.encode`` exactly) plus the
``.model`` itself. No BOS/EOS is added when encoding: megasink's preprocessor appends EOS
to documents and adds no BOS, so a prompt is encoded as in training.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
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


def copy_hf_tokenizer(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the HF tokenizer files present in src_dir; returns the names copied."""
    copied = []
    for name in HF_TOKENIZER_FILES:
        if (Path(src_dir) / name).exists():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def find_spm_model(ckpt_dir: Path, data_tokenizer: str = "", explicit: Optional[str] = None) -> Optional[Path]:
    """The sentencepiece model of a checkpoint: --tokenizer, the step dir's copy, or data.tokenizer."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"--tokenizer {explicit}: no such sentencepiece model file")
        return p
    for p in (ckpt_dir / "tokenizer.model", Path(data_tokenizer) if data_tokenizer else None):
        if p is not None and p.is_file():
            return p
    return None


def load_encoder(path: str | os.PathLike) -> Callable[[str], list]:
    """text -> token ids, as the model was trained on them.

    A sentencepiece ``.model`` encodes and appends EOS (megasink's preprocessor convention); an
    HF tokenizer directory encodes with its own special-token settings (e.g. Llama's BOS).
    """
    p = Path(path)
    if p.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(p))
        eos = sp.eos_id()
        return lambda text: sp.encode(text) + ([eos] if eos >= 0 else [])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)  # no prompt for the model's code
    return lambda text: list(tok(text)["input_ids"])


def load_decoder(path: str | os.PathLike) -> Callable[[list], str]:
    """token ids -> text, the inverse of ``load_encoder``: control and special tokens (EOS, BOS) are dropped."""
    p = Path(path)
    if p.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(p))
        return lambda ids: sp.decode([int(i) for i in ids])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    return lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=True)
