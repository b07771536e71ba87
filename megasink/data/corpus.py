"""Small real-English corpora that need no download, and a FineWeb-Edu-schema writer.

FineWeb-Edu cannot be downloaded on every machine; for the quickstart, the benchmarks and
tests these stand in for educational web text:

- ``python_doc_documents``: the reStructuredText sources of the Python documentation that
  Debian's ``python3.X-doc`` package installs (~11 MB of tutorial and reference prose),
  one document per top-level section;
- ``stdlib_docstring_documents``: the docstrings of the standard library's modules (always
  present, ~1.5 MB), one document per module.

``write_fineweb_edu`` stores documents as FineWeb-Edu publishes them (parquet with
``text``, ``id``, ``dump``, ``url``, ``file_path``, ``language``, ``language_score``,
``token_count``, ``score``, ``int_score``) or as JSON lines with the same keys.
"""
from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
from typing import Iterator, Optional

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "__pycache__"}


def python_doc_root() -> Optional[str]:
    """Folder of the Python documentation sources installed by ``python3.X-doc``, if any."""
    found = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    return found[-1] if found else None


def python_doc_documents(min_chars: int = 200) -> Iterator[str]:
    """Sections of the Python documentation sources, in a fixed order."""
    root = python_doc_root()
    if root is None:
        raise FileNotFoundError(
            "Python documentation sources not found under /usr/share/doc/python3*/html/_sources "
            "(install them with: apt-get install python3.11-doc)"
        )
    for path in sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        # split before section titles underlined with '=' or '-' (the line after the title)
        for section in re.split(r"\n(?=[^\n]+\n[=\-]{4,}\n)", text):
            section = section.strip()
            if len(section) >= min_chars:
                yield section


def stdlib_docstring_documents(min_chars: int = 200) -> Iterator[str]:
    """One document per standard-library module: its docstrings joined by blank lines."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        parts.append(doc)
            text = "\n\n".join(parts)
            if len(text) >= min_chars:
                yield text


def builtin_documents(max_docs: int = 0, source: str = "auto") -> list[str]:
    """Up to ``max_docs`` documents (0: all) from ``source``: auto | python-doc | stdlib."""
    if source not in ("auto", "python-doc", "stdlib"):
        raise ValueError(f"source={source!r} is not one of auto, python-doc, stdlib")
    if source == "python-doc" or (source == "auto" and python_doc_root() is not None):
        it = python_doc_documents()
    else:
        it = stdlib_docstring_documents()
    docs = []
    for doc in it:
        docs.append(doc)
        if max_docs and len(docs) >= max_docs:
            break
    return docs


def fineweb_edu_records(docs: list[str], int_scores: Optional[list[int]] = None) -> list[dict]:
    """FineWeb-Edu-shaped records for ``docs`` (scores cycle 1..5 unless given)."""
    records = []
    for i, text in enumerate(docs):
        int_score = int_scores[i] if int_scores is not None else 1 + i % 5
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
        records.append(
            {
                "text": text,
                "id": f"<urn:uuid:{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}>",
                "dump": "CC-MAIN-2024-10",
                "url": f"https://example.org/doc/{i}",
                "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/example.warc.gz",
                "language": "en",
                "language_score": 0.95,
                "token_count": len(text.split()),
                "score": float(int_score) + 0.25,
                "int_score": int_score,
            }
        )
    return records


def write_fineweb_edu(docs: list[str], path: str, int_scores: Optional[list[int]] = None) -> str:
    """Write ``docs`` in FineWeb-Edu's schema to ``path`` (.parquet, .jsonl, .jsonl.gz, .jsonl.zst)."""
    records = fineweb_edu_records(docs, int_scores)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=1000)
        return path
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    elif path.endswith(".zst"):
        import zstandard

        payload = zstandard.ZstdCompressor().compress(payload)
    with open(path, "wb") as f:
        f.write(payload)
    return path
