#!/usr/bin/env python
"""Merge the per-task outputs of slurm/preprocess.sbatch into one corpus prefix.

Each array task wrote ``PARTS/part_NNNNN`` with tools/preprocess_data.py (``.bin/.idx``
or shards ``part_NNNNN_MMMMM.*``, ``part_NNNNN_valid.*`` and ``part_NNNNN.meta.json``).
The merge

- moves every training file, in part order, to the shards ``PREFIX_00000.bin/.idx``,
  ``PREFIX_00001.*``, ... (a rename: no data is copied; the loader reads shards in order),
- concatenates the validation parts into ``PREFIX_valid.bin/.idx``,
- writes ``PREFIX.meta.json`` (counts summed, same schema as one preprocessing run) last,
- and removes PARTS.

    python slurm/merge_parts.py data/fwe/fwe.parts data/fwe/fwe --expect 64

It refuses parts made with different tokenizers or token dtypes, a missing part (with
``--expect``), and an existing PREFIX (unless ``--overwrite``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasink.data.indexed import IndexedDataset, IndexedDatasetWriter, bin_path, idx_path  # noqa: E402
from megasink.data.outputs import existing_outputs, meta_path, shard_prefix, valid_prefix  # noqa: E402
from megasink.utils import atomic_write_text, fsync_dir  # noqa: E402

PART_RE = re.compile(r"part_(\d+)\.meta\.json$")


def find_parts(parts_dir: str) -> list[tuple[int, str]]:
    """``[(task index, part prefix)]`` of the finished parts (those with a meta.json), in order."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(parts_dir), "part_*.meta.json")):
        m = PART_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path[: -len(".meta.json")]))
    return sorted(found)


def _split_total(metas: list[dict], split: str) -> dict:
    docs = sum(m["splits"].get(split, {}).get("documents", 0) for m in metas)
    tokens = sum(m["splits"].get(split, {}).get("tokens", 0) for m in metas)
    nbytes = sum(m["splits"].get(split, {}).get("bytes", 0) for m in metas)
    return {"documents": docs, "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else None}


def merged_meta(metas: list[dict], train_prefixes: list[str], valid: str | None) -> dict:
    """One meta.json for the merged corpus, in the schema of megasink.data.preprocess."""
    first = metas[0]
    skipped: dict = {}
    for m in metas:
        for k, v in m.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
    splits = {"train": {"prefixes": [os.path.basename(p) for p in train_prefixes], **_split_total(metas, "train")}}
    if valid:
        splits["valid"] = {"prefixes": [os.path.basename(valid)], **_split_total(metas, "valid")}
    inputs = [p for m in metas for p in m.get("inputs", [])]
    meta = dict(first)
    meta["options"] = dict(first.get("options", {}), inputs=inputs)
    meta.update({
        "inputs": inputs,
        "documents_read": sum(m.get("documents_read", 0) for m in metas),
        "skipped": skipped,
        "splits": splits,
        "merged_from_parts": len(metas),
    })
    return meta


def merge_parts(parts_dir: str, prefix: str, expect: int = 0, overwrite: bool = False) -> dict:
    """Merge the parts in ``parts_dir`` into ``prefix``; returns the written meta dict."""
    parts = find_parts(parts_dir)
    if not parts:
        raise FileNotFoundError(f"no finished part (part_*.meta.json) in {parts_dir}")
    if expect and len(parts) != expect:
        have = [i for i, _ in parts]
        raise ValueError(f"{parts_dir}: expected {expect} parts, found {len(parts)} (task indices {have}): "
                         "rerun the failed array tasks, then the merge")
    metas = []
    for _, p in parts:
        with open(meta_path(p)) as f:
            metas.append(json.load(f))
    for (_, p), m in zip(parts, metas):
        if m["tokenizer"].get("sha256") != metas[0]["tokenizer"].get("sha256") or m["dtype"] != metas[0]["dtype"]:
            raise ValueError(f"{p} was tokenized with {m['tokenizer'].get('model')} ({m['dtype']}), "
                             f"{parts[0][1]} with {metas[0]['tokenizer'].get('model')} ({metas[0]['dtype']})")
    stale = existing_outputs(prefix)
    if stale and not overwrite:
        raise FileExistsError(f"{prefix} already has files ({stale[0]}, ...): pass --overwrite to replace them")
    if os.path.exists(meta_path(prefix)):
        os.unlink(meta_path(prefix))  # first, so no reader pairs an old meta with new data
    for path in stale:
        if os.path.exists(path):
            os.unlink(path)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    # training files: renamed into shards, .bin before .idx
    train_prefixes = []
    for (_, p), m in zip(parts, metas):
        for name in m["splits"]["train"]["prefixes"]:
            src = os.path.join(os.path.dirname(p), name)
            dst = shard_prefix(prefix, len(train_prefixes))
            os.replace(bin_path(src), bin_path(dst))
            os.replace(idx_path(src), idx_path(dst))
            train_prefixes.append(dst)

    # validation parts: concatenated
    valid_parts = [valid_prefix(p) for (_, p), m in zip(parts, metas) if "valid" in m["splits"]]
    if valid_parts:
        writer = IndexedDatasetWriter(valid_prefix(prefix), metas[0]["dtype"], tmp_tag="merge")
        try:
            for vp in valid_parts:
                ds = IndexedDataset(vp)
                starts, lengths = ds.document_spans()
                if len(lengths):
                    writer.add_documents(ds.tokens[starts[0]: starts[-1] + lengths[-1]], lengths)
            writer.finalize()
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    meta = merged_meta(metas, train_prefixes, valid_prefix(prefix) if valid_parts else None)
    atomic_write_text(meta_path(prefix), json.dumps(meta, indent=2) + "\n")
    fsync_dir(os.path.dirname(os.path.abspath(prefix)))
    shutil.rmtree(parts_dir)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts_dir", help="folder of part_NNNNN outputs (PREFIX.parts)")
    p.add_argument("prefix", help="output prefix of the merged corpus (data.path)")
    p.add_argument("--expect", type=int, default=0, help="number of parts that must be there (0: any)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")
    args = p.parse_args(argv)
    try:
        meta = merge_parts(args.parts_dir, args.prefix, args.expect, args.overwrite)
    except (OSError, ValueError) as e:
        print(f"merge_parts: error: {e}", file=sys.stderr)
        return 2
    train = meta["splits"]["train"]
    print(f"merge_parts: {meta['merged_from_parts']} parts -> {args.prefix}: {len(train['prefixes'])} shard(s), "
          f"{train['documents']} documents, {train['tokens']} tokens"
          + (f"; valid {meta['splits']['valid']['tokens']} tokens" if "valid" in meta["splits"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
