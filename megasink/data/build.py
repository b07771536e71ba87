"""From ``DataConfig`` to a dataset: prefixes, shards, weights, validation split, meta.json.

``data.path`` entries are ``PREFIX`` or ``WEIGHT PREFIX`` (Megatron's alternating
``WEIGHT PREFIX WEIGHT PREFIX`` list works too), or the single entry ``synthetic``. A
prefix P names ``P.bin/.idx``, or when those do not exist the shards ``P_00000``,
``P_00001``, ... written by ``tools/preprocess_data.py --shard-size``. The validation
split is ``data.valid_path`` or, when empty, ``P_valid`` next to each training prefix
(same weights).

A corpus's ``meta.json`` records its tokenizer's identity (``megasink.data.tokenizer``); when
``data.tokenizer`` is set, it must be the same tokenizer (same files, wherever they lie: the
original, a checkpoint's copy, an export), so a run never trains on ids another tokenizer wrote.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

from megasink.data.blending import BlendedDataset
from megasink.data.indexed import exists
from megasink.data.outputs import SHARD_DIGITS, find_shards, meta_path, valid_prefix
from megasink.data.packing import PackedDataset, SyntheticDataset
from megasink.data.tokenizer import tokenizer_kind, tokenizer_sha256
from megasink.errors import DataError

SPLITS = ("train", "valid")
VALID_SUFFIX = "_valid"


def parse_data_paths(entries, key: str = "data.path") -> list[tuple[Optional[float], str]]:
    """``[(weight or None, prefix), ...]`` from config entries; errors name ``key``."""
    tokens: list[str] = []
    for entry in entries or []:
        tokens.extend(str(entry).split())
    if not tokens:
        raise DataError(f"{key} is empty: give dataset prefixes (PREFIX or 'WEIGHT PREFIX') or 'synthetic'")
    out: list[tuple[Optional[float], str]] = []
    i = 0
    while i < len(tokens):
        weight = _as_weight(tokens[i])
        if weight is None:
            out.append((None, tokens[i]))
            i += 1
            continue
        if i + 1 >= len(tokens) or _as_weight(tokens[i + 1]) is not None:
            raise DataError(f"{key}: weight {tokens[i]} is not followed by a dataset prefix")
        if weight <= 0:
            raise DataError(f"{key}: weight {tokens[i]} of {tokens[i + 1]} must be positive")
        out.append((weight, tokens[i + 1]))
        i += 2
    weighted = {w is not None for w, _ in out}
    if len(weighted) > 1:
        raise DataError(f"{key}: give a weight for every prefix or for none ({entries})")
    return out


def _as_weight(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def canonical_prefix(prefix: str) -> str:
    """``prefix`` without a ``.bin`` / ``.idx`` suffix given by mistake (when that names a dataset)."""
    if not exists(prefix) and prefix.endswith((".bin", ".idx")) and exists(prefix[:-4]):
        return prefix[:-4]
    return prefix


def resolve_prefix(prefix: str, key: str = "data.path") -> list[str]:
    """File prefixes behind ``prefix``: itself, or its shards ``prefix_NNNNN``."""
    prefix = canonical_prefix(prefix)
    if exists(prefix):
        return [prefix]
    shards = find_shards(prefix)
    if shards:
        return shards
    raise FileNotFoundError(
        f"{key}: dataset {prefix!r} not found: expected {prefix}.bin + {prefix}.idx or shards "
        f"{prefix}_00000.bin/.idx (write them with tools/preprocess_data.py --output-prefix {prefix})"
    )


def read_meta(prefix: str) -> tuple[Optional[dict], str]:
    """(meta.json of the corpus that ``prefix`` belongs to, its split name), or (None, split)."""
    split = "train"
    candidates = [prefix]
    if prefix.endswith(VALID_SUFFIX):
        candidates.insert(0, prefix[: -len(VALID_SUFFIX)])
        split = "valid"
    elif re.search(r"_\d{%d}$" % SHARD_DIGITS, prefix):  # one shard of a corpus
        candidates.append(prefix[: -SHARD_DIGITS - 1])
    for i, base in enumerate(candidates):
        path = meta_path(base)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f), (split if i == 0 else "train")
    return None, split


def _check_meta(meta: Optional[dict], prefix: str, vocab_size: int, tokenizer: str) -> None:
    if meta is None:
        return
    tok = meta.get("tokenizer", {})
    if tok.get("vocab_size", 0) > vocab_size:
        raise DataError(
            f"dataset {prefix} was tokenized with a vocabulary of {tok['vocab_size']} ({tok.get('model')}), "
            f"larger than model.vocab_size={vocab_size}"
        )
    if not (tokenizer and tok.get("sha256")):
        return
    try:
        digest = tokenizer_sha256(tokenizer)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {e} (dataset {prefix} was tokenized with {tok.get('model')})") from e
    if digest != tok["sha256"]:
        raise DataError(
            f"dataset {prefix} was tokenized with {tok.get('model')} (sha256 {tok['sha256'][:12]}…), "
            f"not with data.tokenizer={tokenizer} (sha256 {digest[:12]}…): set data.tokenizer to the tokenizer "
            f"that wrote the data, or tokenize it again with tools/preprocess_data.py --tokenizer {tokenizer}"
        )


def _check_tokenizer_path(tokenizer: str) -> None:
    """An existing data.tokenizer must be a tokenizer (checkpoints copy it; better to fail now than at the
    first save). A missing one is an error only where a corpus records the tokenizer it needs."""
    if tokenizer and os.path.exists(tokenizer):
        try:
            tokenizer_kind(tokenizer)
        except ValueError as e:
            raise DataError(f"data.tokenizer: {e}") from e


def _packed(prefix: str, seq_len: int, vocab_size: int, tokenizer: str, key: str) -> PackedDataset:
    prefix = canonical_prefix(prefix)
    files = resolve_prefix(prefix, key)
    meta, split = read_meta(prefix)
    _check_meta(meta, prefix, vocab_size, tokenizer)
    bpt = None
    if meta is not None:
        bpt = meta.get("splits", {}).get(split, {}).get("bytes_per_token")
    ds = PackedDataset(files, seq_len, bytes_per_token=bpt, name=prefix)
    if len(ds) == 0:
        raise DataError(f"{key}: dataset {prefix} has {ds.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return ds


def _split_entries(data_cfg, split: str) -> tuple[list, str]:
    train = parse_data_paths(data_cfg.path, "data.path")
    if split == "train":
        return train, "data.path"
    if data_cfg.valid_path:
        return parse_data_paths(data_cfg.valid_path, "data.valid_path"), "data.valid_path"
    entries = []
    for weight, prefix in train:
        vp = valid_prefix(canonical_prefix(prefix))
        if not exists(vp):
            raise FileNotFoundError(
                f"validation data for {prefix!r} not found: expected {vp}.bin + {vp}.idx (write it with "
                "tools/preprocess_data.py --valid-fraction F) or set data.valid_path"
            )
        entries.append((weight, vp))
    return entries, "data.path (validation: PREFIX_valid)"


def build_dataset(data_cfg, seq_len: int, vocab_size: int, seed: int, split: str = "train"):
    """The packed (and possibly blended) dataset of ``split`` (train | valid) for ``data_cfg``.

    ``len(ds)``: samples; ``ds[i]``: ``{"tokens", "doc_ids"}`` int64 (seq_len+1,);
    ``ds.bytes_per_token``: float from meta.json, or None.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    _check_tokenizer_path(data_cfg.tokenizer)
    paths = [str(p) for p in (data_cfg.path or [])]
    if [p.strip().lower() for p in paths] == ["synthetic"]:
        return SyntheticDataset(seq_len, vocab_size, seed, stream=SPLITS.index(split), documents=data_cfg.synthetic_docs)
    if any(p.strip().lower() == "synthetic" for p in paths):
        raise DataError(f"data.path: 'synthetic' cannot be mixed with dataset prefixes ({paths})")
    entries, key = _split_entries(data_cfg, split)
    datasets = [_packed(prefix, seq_len, vocab_size, data_cfg.tokenizer, key) for _, prefix in entries]
    if len(datasets) == 1:
        return datasets[0]
    weights = [w if w is not None else 1.0 for w, _ in entries]
    if all(w is None for w, _ in entries):  # no weights: blend by size
        weights = [float(len(d)) for d in datasets]
    # validation blends do not depend on the training seed, so runs stay comparable
    return BlendedDataset(datasets, weights, seed if split == "train" else 0)
