#!/usr/bin/env python
"""Tokenize FineWeb-Edu (parquet), JSON lines or a saved `datasets` folder into Megatron
indexed datasets: PREFIX.bin/.idx (or PREFIX_00000.* shards), PREFIX_valid.* and
PREFIX.meta.json. A thin CLI over megasink.data.preprocess (see README "Data workflow").
--tokenizer is a sentencepiece .model or a Hugging Face tokenizer directory (tokenizer.json,
e.g. a Llama 3 or Qwen download); vocabularies over 65536 ids are stored as int32.

    python tools/preprocess_data.py --input data/fineweb-edu/*.parquet \\
        --tokenizer tok/fwe32k.model --output-prefix data/fwe/fwe \\
        --min-int-score 3 --valid-fraction 0.001 --shard-size 1G --workers 16
    python tools/preprocess_data.py --input data/fineweb-edu/*.parquet \\
        --tokenizer models/Llama-3.2-1B --output-prefix data/fwe-llama3/fwe --workers 16

Fine-tuning data (JSON lines; a loss mask beside the tokens, megasink/data/sft.py):

    python tools/preprocess_data.py --input data/reasoning.jsonl --format chat \\
        --tokenizer models/Llama-3.1-8B-Instruct --output-prefix data/reasoning/chat --valid-fraction 0.01
    python tools/preprocess_data.py --input data/pairs.jsonl --format prompt_response \\
        --tokenizer models/Llama-3.1-8B --output-prefix data/reasoning/pairs
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasink.data.preprocess import PreprocessConfig, preprocess, summary_line  # noqa: E402
from megasink.data.sft import FORMATS  # noqa: E402


def parse_size(text: str) -> int:
    """'1000', '500K', '100M', '2G' (powers of 1000) -> int."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper()
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1000, 500K, 100M or 2G") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line (flags map one to one onto PreprocessConfig)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="parquet/jsonl[.gz|.zst] files, directories, globs, or a datasets save_to_disk folder")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="sentencepiece .model file or Hugging Face tokenizer directory (tokenizer.json)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx, PREFIX_valid.*, PREFIX.meta.json")
    p.add_argument("--text-key", default="text", help="column / JSON key of the text (default: text)")
    p.add_argument("--format", default="text", choices=FORMATS,
                   help="records: text (default); prompt_response (JSON keys --prompt-key, --response-key) or chat "
                        "(--messages-key: a list of {role, content}, rendered with the tokenizer's chat template): "
                        "both write PREFIX.lossmask.bin/.idx, 1 on the tokens the loss applies to (responses / "
                        "assistant turns)")
    p.add_argument("--prompt-key", default="prompt", help="prompt_response: JSON key of the prompt (default: prompt)")
    p.add_argument("--response-key", default="response",
                   help="prompt_response: JSON key of the response (default: response)")
    p.add_argument("--messages-key", default="messages", help="chat: JSON key of the messages (default: messages)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes (0: in the main process)")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="fraction of documents held out as PREFIX_valid (by text hash)")
    p.add_argument("--shard-size", type=parse_size, default=0, help="tokens per training shard, e.g. 1G (default: one file)")
    p.add_argument("--min-int-score", type=int, default=None, help="keep int_score >= N (FineWeb-Edu: 3)")
    p.add_argument("--min-score", type=float, default=None, help="keep score >= X")
    p.add_argument("--min-chars", type=int, default=0, help="skip documents shorter than N characters")
    p.add_argument("--min-tokens", type=int, default=0, help="skip documents with fewer than N tokens")
    p.add_argument("--max-docs", type=parse_size, default=0, help="read at most N input documents")
    p.add_argument("--split", default="train", help="split of a DatasetDict folder (default: train)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to each document")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="prepend BOS to each document (default: when the tokenizer's own encode does, e.g. Llama 3)")
    bos.add_argument("--no-bos", dest="prepend_bos", action="store_false", help="never prepend BOS")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per work item")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Run; exit status 2 with a one-line error on bad input."""
    args = build_parser().parse_args(argv)
    cfg = PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        text_key=args.text_key,
        format=args.format,
        prompt_key=args.prompt_key,
        response_key=args.response_key,
        messages_key=args.messages_key,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        shard_size=args.shard_size,
        min_int_score=args.min_int_score,
        min_score=args.min_score,
        min_chars=args.min_chars,
        min_tokens=args.min_tokens,
        max_docs=args.max_docs,
        split=args.split,
        append_eos=not args.no_eos,
        prepend_bos=args.prepend_bos,
        overwrite=args.overwrite,
        chunk_docs=args.chunk_docs,
        progress=not args.no_progress,
    )
    try:
        out = preprocess(cfg)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(out), file=sys.stderr)
    if cfg.valid_fraction > 0 and out.valid.documents == 0:
        print(f"warning: --valid-fraction {cfg.valid_fraction} held out no document; the validation split is empty",
              file=sys.stderr)
    for path in out.outputs:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
