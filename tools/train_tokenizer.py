#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE by default, byte fallback, unk/bos/eos/pad = 0/1/2/3)
on the same inputs tools/preprocess_data.py reads, from a reproducible sample of documents.
Writes OUT.model, OUT.vocab and OUT.json (ids, options, coverage). A thin CLI over
megasink.data.tokenizer.

    python tools/train_tokenizer.py --input data/fineweb-edu/*.parquet \\
        --model-prefix tok/fwe32k --vocab-size 32000 --max-docs 200000 --min-int-score 3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasink.data.tokenizer import MODEL_TYPES, TokenizerConfig, train_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (flags map one to one onto TokenizerConfig)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="parquet/jsonl[.gz|.zst] files, directories, globs, or a datasets save_to_disk folder")
    p.add_argument("--model-prefix", required=True, help="output prefix: writes PREFIX.model, .vocab, .json")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="bpe (default) or unigram")
    p.add_argument("--max-docs", type=int, default=100_000, help="documents sampled for training (default 100000)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document sample")
    p.add_argument("--text-key", default="text", help="column / JSON key of the text")
    p.add_argument("--min-int-score", type=int, default=None, help="sample only int_score >= N")
    p.add_argument("--character-coverage", type=float, default=0.9999, help="sentencepiece character_coverage")
    p.add_argument("--num-threads", type=int, default=0, help="trainer threads (0: all CPUs)")
    p.add_argument("--split", default="train", help="split of a DatasetDict folder")
    return p


def main(argv=None) -> int:
    """Train; exit status 2 with a one-line error on bad input."""
    args = build_parser().parse_args(argv)
    cfg = TokenizerConfig(
        inputs=args.input,
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        max_docs=args.max_docs,
        seed=args.seed,
        text_key=args.text_key,
        min_int_score=args.min_int_score,
        character_coverage=args.character_coverage,
        num_threads=args.num_threads,
        split=args.split,
    )
    try:
        s = train_tokenizer(cfg)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {cfg.model_prefix}.model ({cfg.model_type}): vocab size {s['vocab_size']}, "
        f"ids unk={s['unk_id']} bos={s['bos_id']} eos={s['eos_id']} pad={s['pad_id']}; "
        f"{s['documents_sampled']:,} of {s['documents_seen']:,} documents sampled; "
        f"coverage {100 * s['token_coverage']:.2f}% of tokens are not byte-fallback, "
        f"{s['chars_per_token']:.2f} chars/token; {s['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
