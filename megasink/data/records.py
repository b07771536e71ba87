"""One raw record -> its text, or the reason it is skipped: the reading and filtering rules that
the preprocessor (``megasink.data.preprocess``) and tokenizer training (``megasink.data.tokenizer``)
share, so that a tokenizer is trained on exactly the documents that will be tokenized.

A record is one JSON line or one parquet / Arrow row of a :class:`megasink.data.sources.Chunk`.
``record_fields`` decodes it to ``(text, int_score, score)``; ``keep_text`` validates the text and
applies the filters. Both count every skipped record under one of ``SKIP_REASONS``.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megasink.data.sources import Chunk

SKIP_REASONS = (
    "invalid_json",
    "missing_text",
    "not_text",
    "invalid_utf8",
    "empty",
    "missing_score",
    "low_int_score",
    "low_score",
    "too_short",
    "too_few_tokens",  # counted by the preprocessor after encoding
    "invalid_record",  # prompt_response / chat: the fields are missing or of the wrong type
)


@dataclass(frozen=True)
class RecordFilter:
    """Which records are read and kept (picklable: it travels to the preprocessor's workers)."""

    text_key: str = "text"
    min_int_score: Optional[int] = None
    min_score: Optional[float] = None
    min_chars: int = 0


def record_fields(chunk: Chunk, i: int, text_key: str, skipped: Counter):
    """(text, int_score, score) of record i, or None after counting why it is skipped."""
    if chunk.kind == "jsonl":
        try:
            rec = json.loads(chunk.records[i])
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            return None
        except ValueError:
            skipped["invalid_json"] += 1
            return None
        if not isinstance(rec, dict):
            skipped["invalid_json"] += 1
            return None
        if rec.get(text_key) is None:
            skipped["missing_text"] += 1
            return None
        return rec[text_key], rec.get("int_score"), rec.get("score")
    value = chunk.records[i]
    if value is None:
        skipped["missing_text"] += 1
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            return None
    int_score = chunk.int_scores[i] if chunk.int_scores is not None else None
    score = chunk.scores[i] if chunk.scores is not None else None
    return value, int_score, score


def _passes_score(value, minimum, low_reason: str, skipped: Counter) -> bool:
    if minimum is None:
        return True
    if not isinstance(value, (int, float)):
        skipped["missing_score"] += 1
        return False
    if value < minimum:
        skipped[low_reason] += 1
        return False
    return True


def keep_text(text, int_score, score, filt: RecordFilter, skipped: Counter) -> Optional[bytes]:
    """UTF-8 bytes of ``text`` if it passes validation and the filters, else None (counted)."""
    if not isinstance(text, str):
        skipped["not_text"] += 1
        return None
    try:
        raw = text.encode("utf-8")  # lone surrogates from JSON escapes fail here
    except UnicodeEncodeError:
        skipped["invalid_utf8"] += 1
        return None
    if not text or text.isspace():
        skipped["empty"] += 1
        return None
    if not (_passes_score(int_score, filt.min_int_score, "low_int_score", skipped)
            and _passes_score(score, filt.min_score, "low_score", skipped)):
        return None
    if len(text) < filt.min_chars:
        skipped["too_short"] += 1
        return None
    return raw
