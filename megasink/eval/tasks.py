"""Local lm-evaluation-harness tasks from a validation set (the library behind tools/make_eval_task.py).

From token ids (an indexed dataset such as ``PREFIX_valid``, decoded with its tokenizer) or
raw text (.jsonl[.gz] / .parquet), a task directory with absolute paths, so that
``megasink eval CKPT --include-path DIR --tasks NAME_next_passage,NAME_bpb`` runs offline:

- ``NAME_next_passage`` (multiple choice; acc, acc_norm): the opening ``context_words`` words
  of a document; the choices are the document's own next ``passage_words`` words and the
  passages at the same place in 3 other documents (seeded). Chance is 25 %.
- ``NAME_bpb`` (loglikelihood_rolling; bits_per_byte, byte_perplexity, word_perplexity): whole
  documents, scored with rolling windows of the model's context (megasink/eval/scoring.py
  computes the same number with megasink's own forward).

Files: ``next_passage.jsonl`` / ``.yaml``, ``bpb.jsonl`` / ``.yaml`` and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import yaml

NUM_CHOICES = 4
_WORD = re.compile(r"\S+")


@dataclass
class TaskDir:
    """What make_eval_tasks wrote."""

    path: str
    tasks: list
    num_questions: int
    num_documents: int


def _no_encoding(text: str) -> list:
    raise AssertionError("task generation reads text; it never encodes")


def _recorded_tokenizer(ds) -> Optional[str]:
    """The sentencepiece model recorded in the meta.json of an indexed dataset, if it still exists."""
    from megasink.data.build import read_meta

    model = (read_meta(ds.prefix)[0] or {}).get("tokenizer", {}).get("model")
    return model if model and Path(model).is_file() else None


def document_texts(paths: list, tokenizer: Optional[str] = None, text_key: str = "text") -> Iterator[str]:
    """Non-empty documents of indexed datasets (decoded) and text files, in order."""
    from megasink.diagnose import DocumentSource
    from megasink.hf.tokenizer import load_decoder

    source = DocumentSource(paths, _no_encoding, text_key)
    decode = None
    for kind, payload in source.docs:
        if kind == "tokens":
            if decode is None:
                tokenizer = tokenizer or _recorded_tokenizer(payload[0])
                if tokenizer is None:
                    raise ValueError(f"{payload[0].prefix}: token ids need their tokenizer to become text; none "
                                     "is recorded in the dataset's meta.json (pass --tokenizer)")
                decode = load_decoder(tokenizer)
            ds, start, length = payload
            text = decode(ds.tokens[start:start + length])
        else:
            text = payload
        if text.strip():
            yield text


def _split_at_word(text: str, context_words: int, passage_words: int) -> Optional[tuple[str, str]]:
    """(first context_words words, the next passage_words words) with their own spacing, or None."""
    words = [m.span() for _, m in zip(range(context_words + passage_words), _WORD.finditer(text))]
    if len(words) < context_words + passage_words:
        return None
    context = text[:words[context_words - 1][1]]
    return context, text[words[context_words][0]:words[-1][1]]


def next_passage_questions(texts: list, context_words: int = 64, passage_words: int = 16,
                           seed: int = 1234) -> list[dict]:
    """Multiple-choice rows {context, choices, label}: the true next passage among NUM_CHOICES."""
    if context_words < 1 or passage_words < 1:
        raise ValueError(f"--context-words {context_words} and --passage-words {passage_words} must be >= 1")
    splits = [s for s in (_split_at_word(t, context_words, passage_words) for t in texts) if s is not None]
    rng = random.Random(seed)
    rows = []
    for i, (context, passage) in enumerate(splits):
        others = list({p for j, (_, p) in enumerate(splits) if j != i and p != passage})
        if len(others) < NUM_CHOICES - 1:
            continue
        others.sort()  # a set's order varies between runs; the rng decides
        choices = rng.sample(others, NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, passage)
        rows.append({"context": context, "choices": choices, "label": label})
    if not rows:
        raise ValueError(f"no question: fewer than {NUM_CHOICES} distinct documents have "
                         f"{context_words + passage_words} words (lower --context-words / --passage-words)")
    return rows


def _task_yamls(name: str, out: Path) -> dict:
    """{file name: YAML text} of the two tasks, data at out (absolute)."""
    def data(fname: str) -> dict:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(out / fname)}},
                "test_split": "test"}

    mc = {"task": f"{name}_next_passage", **data("next_passage.jsonl"), "fewshot_split": "test",
          "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
          "doc_to_target": "label", "target_delimiter": " ",
          "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
          "metadata": {"version": 1.0}}
    bpb = {"task": f"{name}_bpb", **data("bpb.jsonl"), "output_type": "loglikelihood_rolling",
           "doc_to_text": "", "doc_to_target": "text",
           "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                           (("bits_per_byte", "bits_per_byte"), ("byte_perplexity", "weighted_perplexity"),
                            ("word_perplexity", "weighted_perplexity"))],
           "metadata": {"version": 1.0}}
    return {"next_passage.yaml": yaml.safe_dump(mc, sort_keys=False), "bpb.yaml": yaml.safe_dump(bpb, sort_keys=False)}


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def make_eval_tasks(data: list, out_dir, tokenizer: Optional[str] = None, text_key: str = "text",
                    name: str = "megasink", num_docs: int = 500, context_words: int = 64, passage_words: int = 16,
                    seed: int = 1234, overwrite: bool = False) -> TaskDir:
    """Write the two tasks of the first ``num_docs`` documents of ``data`` to out_dir (renamed when complete)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"--name {name!r}: use letters, digits and '_' (it prefixes the task names)")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    texts = [t for _, t in zip(range(num_docs), document_texts(data, tokenizer, text_key))]
    if not texts:
        raise ValueError(f"{', '.join(map(str, data))}: no non-empty document")
    questions = next_passage_questions(texts, context_words, passage_words, seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "next_passage.jsonl").write_text(_jsonl(questions), encoding="utf-8")
    (tmp / "bpb.jsonl").write_text(_jsonl({"text": t} for t in texts), encoding="utf-8")
    for fname, text in _task_yamls(name, out).items():  # paths name the final directory
        (tmp / fname).write_text(text)
    result = TaskDir(str(out), [f"{name}_next_passage", f"{name}_bpb"], len(questions), len(texts))
    manifest = {**asdict(result), "data": [str(Path(p).resolve()) for p in data], "tokenizer": tokenizer,
                "context_words": context_words, "passage_words": passage_words, "seed": seed}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="make_eval_task.py",
        description="Write a local lm-evaluation-harness task directory from a validation set: NAME_next_passage "
                    "(pick the true next passage among 4; acc) and NAME_bpb (rolling log-likelihood; bits per "
                    "byte). Paths inside are absolute: run it offline with "
                    "megasink eval CKPT --include-path OUT --tasks NAME_next_passage,NAME_bpb.")
    p.add_argument("data", nargs="+", help="indexed dataset prefixes (e.g. PREFIX_valid) or text files "
                                           "(.jsonl[.gz], .parquet)")
    p.add_argument("--out", required=True, help="task directory to write")
    p.add_argument("--tokenizer", help="for indexed data: sentencepiece .model or HF tokenizer dir "
                                       "(default: the one in the dataset's meta.json)")
    p.add_argument("--text-key", default="text", help="JSON / parquet field with the text (default text)")
    p.add_argument("--name", default="megasink", help="task name prefix (default megasink)")
    p.add_argument("--num-docs", type=int, default=500, help="documents to use, in order (default 500)")
    p.add_argument("--context-words", type=int, default=64, help="words of context per question (default 64)")
    p.add_argument("--passage-words", type=int, default=16, help="words per choice (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the distractors and answer positions")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        d = make_eval_tasks(args.data, args.out, args.tokenizer, args.text_key, args.name, args.num_docs,
                            args.context_words, args.passage_words, args.seed, args.overwrite)
    except (ValueError, OSError) as e:  # missing inputs, too-short documents, an existing --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {d.path}: {d.tasks[0]} ({d.num_questions} questions), {d.tasks[1]} ({d.num_documents} documents)")
    print(f"run: megasink eval CKPT --include-path {d.path} --tasks {','.join(d.tasks)}")
    return 0
