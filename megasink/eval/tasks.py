"""Local lm-evaluation-harness tasks from a validation set (the library behind tools/make_eval_task.py).

From token ids (an indexed dataset such as ``PREFIX_valid``, decoded with its tokenizer) or
raw text (.jsonl[.gz] / .parquet), a task directory with absolute paths, so that
``megasink eval CKPT --include-path DIR --tasks NAME_next_passage,NAME_bpb`` runs offline:

- ``NAME_next_passage`` (multiple choice; acc, acc_norm): the opening ``context_words`` words
  of a document; the choices are the document's own next ``passage_words`` words and the
  passages at the same place in 3 other documents (seeded). Chance is 25 %. Fitted to a model
  (``max_tokens``, its trained length): a context that would not fit with one of its choices
  loses its first words until it does (what lm-eval would cut from the left, with a warning
  per request), and a question where no context fits is left out.
- ``NAME_bpb`` (loglikelihood_rolling; bits_per_byte, byte_perplexity, word_perplexity): whole
  documents, scored with rolling windows of the model's context (megasink/eval/scoring.py
  computes the same number with megasink's own forward).

Documents are read by megasink/data/documents.py. Files: ``next_passage.jsonl`` / ``.yaml``,
``bpb.jsonl`` / ``.yaml`` and ``manifest.json``.
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
from typing import Callable, Iterator, Optional

import yaml

NUM_CHOICES = 4
TARGET_DELIMITER = " "  # lm-eval joins context and choice with it
_WORD = re.compile(r"\S+")


@dataclass
class TaskDir:
    """What make_eval_tasks wrote."""

    path: str
    tasks: list
    num_questions: int
    num_documents: int
    max_tokens: Optional[int] = None  # the model length the questions were fitted to
    num_shortened: int = 0  # contexts that lost their first words to fit
    num_dropped: int = 0  # questions left out: no context fitted


def _recorded_tokenizer(ds) -> Optional[str]:
    """The tokenizer (a sentencepiece model or an HF tokenizer directory) recorded in the meta.json
    of an indexed dataset, if it still exists."""
    from megasink.data.build import read_meta

    model = (read_meta(ds.prefix)[0] or {}).get("tokenizer", {}).get("model")
    return model if model and Path(model).exists() else None


def data_tokenizer(source, tokenizer: Optional[str] = None) -> Optional[str]:
    """``tokenizer``, else the one the first indexed dataset of ``source`` records, else None."""
    datasets = source.datasets()
    return tokenizer or (_recorded_tokenizer(datasets[0]) if datasets else None)


def document_texts(source, tokenizer: Optional[str] = None) -> Iterator[str]:
    """Non-empty documents of a ``DocumentSource`` in order, token ids decoded with ``tokenizer``
    (default: the one the dataset's meta.json records)."""
    from megasink.hf.tokenizer import load_decoder

    decode = None
    if source.datasets():
        tok = data_tokenizer(source, tokenizer)
        if tok is None:
            raise ValueError(f"{source.datasets()[0].prefix}: token ids need their tokenizer to become text; none "
                             "is recorded in the dataset's meta.json (pass --tokenizer)")
        decode = load_decoder(tok)
    for i in range(len(source)):
        text = source.text(i, decode)
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


def fit_question(row: dict, encode: Callable[[str], list], max_tokens: int) -> Optional[dict]:
    """``row`` with the fewest first words of its context dropped so that context, delimiter and
    each choice encode to at most ``max_tokens`` tokens; None when even its last word does not fit."""
    def fits(context: str) -> bool:
        return all(len(encode(context + TARGET_DELIMITER + c)) <= max_tokens for c in row["choices"])

    starts = [m.start() for m in _WORD.finditer(row["context"])]
    if fits(row["context"]):
        return row
    lo, hi = 1, len(starts) - 1  # drop starts[:k] words; find the smallest k that fits
    if hi < lo or not fits(row["context"][starts[hi]:]):
        return None
    while lo < hi:  # token counts fall as words go (near enough to bisect; the result is checked)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(row["context"][starts[mid]:]) else (mid + 1, hi)
    return {**row, "context": row["context"][starts[lo]:]}


def fit_questions(rows: list, encode: Callable[[str], list], max_tokens: int) -> tuple[list, int, int]:
    """(fitted rows, contexts shortened, questions left out) for a model of ``max_tokens``."""
    fitted = [fit_question(r, encode, max_tokens) for r in rows]
    kept = [f for f in fitted if f is not None]
    shortened = sum(f is not None and f["context"] != r["context"] for f, r in zip(fitted, rows))
    return kept, shortened, len(rows) - len(kept)


def _task_yamls(name: str, out: Path) -> dict:
    """{file name: YAML text} of the two tasks, data at out (absolute)."""
    def data(fname: str) -> dict:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(out / fname)}},
                "test_split": "test"}

    mc = {"task": f"{name}_next_passage", **data("next_passage.jsonl"), "fewshot_split": "test",
          "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
          "doc_to_target": "label", "target_delimiter": TARGET_DELIMITER,
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


def _fitting(source, tokenizer: Optional[str], model: Optional[str], max_tokens: Optional[int]):
    """(max_tokens, encode) that the questions must fit, or (None, None) with neither given: the
    length ``max_tokens`` or the model's trained length; tokens counted with ``tokenizer``, the
    model's own, or the data's."""
    from megasink.eval.inputs import model_tokenizer, trained_length
    from megasink.hf.tokenizer import load_encoder

    if max_tokens is None and model is None:
        return None, None
    if max_tokens is None:
        max_tokens, _ = trained_length(model)
    tok = tokenizer or (model_tokenizer(model) if model else None) or data_tokenizer(source)
    if tok is None:
        raise ValueError("fitting the questions to a model's length needs its tokenizer to count tokens: pass "
                         "--tokenizer (or --model with one)")
    return max_tokens, load_encoder(tok)


def make_eval_tasks(data: list, out_dir, tokenizer: Optional[str] = None, text_key: str = "text",
                    name: str = "megasink", num_docs: int = 500, context_words: int = 64, passage_words: int = 16,
                    seed: int = 1234, overwrite: bool = False, model: Optional[str] = None,
                    max_tokens: Optional[int] = None) -> TaskDir:
    """Write the two tasks of the first ``num_docs`` documents of ``data`` to out_dir (renamed when
    complete), the questions fitted to ``max_tokens`` or to ``model``'s trained length if given."""
    from megasink.data.documents import DocumentSource

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"--name {name!r}: use letters, digits and '_' (it prefixes the task names)")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    source = DocumentSource(data, text_key)
    texts = [t for _, t in zip(range(num_docs), document_texts(source, tokenizer))]
    if not texts:
        raise ValueError(f"{', '.join(map(str, data))}: no non-empty document")
    questions = next_passage_questions(texts, context_words, passage_words, seed)
    max_tokens, encode = _fitting(source, tokenizer, model, max_tokens)
    shortened = dropped = 0
    if max_tokens is not None:
        questions, shortened, dropped = fit_questions(questions, encode, max_tokens)
        if not questions:
            raise ValueError(f"no question fits {max_tokens} tokens with its choices: lower --passage-words")
    result = TaskDir(str(out), [f"{name}_next_passage", f"{name}_bpb"], len(questions), len(texts), max_tokens,
                     shortened, dropped)
    manifest = {**asdict(result), "data": [str(Path(p).resolve()) for p in data], "tokenizer": tokenizer,
                "model": str(model) if model else None, "context_words": context_words,
                "passage_words": passage_words, "seed": seed}
    _write_task_dir(out, name, questions, texts, manifest)
    return result


def _write_task_dir(out: Path, name: str, questions: list, texts: list, manifest: dict) -> None:
    """The task files, written to OUT.tmp and renamed to out (replacing it) when complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "next_passage.jsonl").write_text(_jsonl(questions), encoding="utf-8")
    (tmp / "bpb.jsonl").write_text(_jsonl({"text": t} for t in texts), encoding="utf-8")
    for fname, text in _task_yamls(name, out).items():  # paths name the final directory
        (tmp / fname).write_text(text)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> int:
    from megasink.eval.inputs import DefaultsFormatter

    p = argparse.ArgumentParser(
        prog="make_eval_task.py", formatter_class=DefaultsFormatter,
        description="Write a local lm-evaluation-harness task directory from a validation set: NAME_next_passage "
                    "(pick the true next passage among 4; acc) and NAME_bpb (rolling log-likelihood; bits per "
                    "byte). Paths inside are absolute: run it offline with "
                    "megasink eval CKPT --include-path OUT --tasks NAME_next_passage,NAME_bpb.")
    p.add_argument("data", nargs="+", help="indexed dataset prefixes (e.g. PREFIX_valid) or text inputs "
                                           "(.parquet, .jsonl[.gz|.zst], folders of them)")
    p.add_argument("--out", required=True, help="task directory to write")
    p.add_argument("--model", help="the checkpoint or HF directory to be evaluated: each question is fitted to its "
                                   "trained length (counted with its tokenizer); without it and --max-tokens, "
                                   "lm-eval cuts longer questions from the left")
    p.add_argument("--max-tokens", type=int, help="fit each question to this many tokens instead (default: --model's "
                                                   "model.seq_len or max_position_embeddings)")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir that decodes indexed data and counts "
                                       "tokens (default: --model's, else the one in the dataset's meta.json)")
    p.add_argument("--text-key", default="text", help="JSON / parquet field with the text")
    p.add_argument("--name", default="megasink", help="task name prefix")
    p.add_argument("--num-docs", type=int, default=500, help="documents to use, in order")
    p.add_argument("--context-words", type=int, default=64, help="words of context per question (at most)")
    p.add_argument("--passage-words", type=int, default=16, help="words per choice")
    p.add_argument("--seed", type=int, default=1234, help="seed of the distractors and answer positions")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        d = make_eval_tasks(args.data, args.out, args.tokenizer, args.text_key, args.name, args.num_docs,
                            args.context_words, args.passage_words, args.seed, args.overwrite, args.model,
                            args.max_tokens)
    except (ValueError, OSError) as e:  # missing inputs, too-short documents, an existing --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {d.path}: {d.tasks[0]} ({d.num_questions} questions), {d.tasks[1]} ({d.num_documents} documents)")
    if d.max_tokens is None:
        print("note: the questions are not fitted to a model's length (pass --model CKPT or --max-tokens N); "
              "lm-eval cuts a longer one from the left, with a warning", file=sys.stderr)
    else:
        print(f"fitted to {d.max_tokens} tokens: {d.num_shortened} contexts shortened from the front, "
              f"{d.num_dropped} questions left out")
    print(f"run: megasink eval CKPT --include-path {d.path} --tasks {','.join(d.tasks)}")
    return 0
