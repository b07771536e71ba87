"""``make quickstart``: the whole workflow on real text, on one CPU machine, in minutes.

1. a small real-English corpus from a package on disk (the Python documentation sources of
   Debian's python3.X-doc, else the standard library's docstrings), written as FineWeb-Edu
   parquet;
2. a sentencepiece tokenizer (tools/train_tokenizer.py);
3. Megatron-format token shards with a held-out split (tools/preprocess_data.py);
4. the tiny sink-attention model trained with the aux loss on 2 processes (torchrun), and
   the same without the aux loss for comparison;
5. a summary: final loss, validation loss and bits-per-byte, per-layer CV of both runs,
   and the importance heatmap PNG in the run directory.

Each stage is skipped when its output already exists (delete .quickstart/ to redo).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})


def build_corpus(work: Path, max_docs: int) -> Path:
    from megasink.data.corpus import builtin_documents, python_doc_root, write_fineweb_edu

    out = work / "corpus" / "train-00000-of-00001.parquet"
    if out.exists():
        return out
    source = "python-doc" if python_doc_root() else "stdlib"
    docs = builtin_documents(max_docs=max_docs, source="auto")
    write_fineweb_edu(docs, str(out))
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text from {source} -> {out}")
    return out


def build_data(work: Path, corpus: Path, vocab: int) -> tuple[Path, Path]:
    tok = work / "tokenizer" / f"spm{vocab}"
    if not tok.with_suffix(".model").exists():
        _run([sys.executable, "tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(tok),
              "--vocab-size", str(vocab), "--max-docs", "20000"])
    prefix = work / "tokens" / "pydoc"
    if not Path(str(prefix) + ".idx").exists():
        _run([sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model",
              str(tok) + ".model", "--output-prefix", str(prefix), "--workers", "2", "--valid-fraction", "0.03"])
    return Path(str(tok) + ".model"), prefix


def train(run_dir: Path, tokenizer: Path, prefix: Path, vocab: int, steps: int, coef: float, nproc: int) -> None:
    overrides = [f"run_dir={run_dir}", f"data.path=[{prefix}]", f"data.tokenizer={tokenizer}",
                 f"model.vocab_size={vocab}", f"train.steps={steps}", f"aux_loss.coef={coef}",
                 "train.log_interval=25", f"train.importance_interval={steps}", f"train.eval_interval={steps}",
                 "train.eval_steps=8", "train.micro_batch_size=8", f"train.global_batch_size={8 * nproc}",
                 "train.warmup_steps=20", "train.resume=auto", "train.progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megasink.train", "configs/tiny-sink.yaml", *overrides]
    _run(cmd, env={"OMP_NUM_THREADS": "1"})


def _final(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_recs = [r for r in recs if "loss" in r]
    out = {"first_loss": train_recs[0]["loss"], "final_loss": train_recs[-1]["loss"], "cv": train_recs[-1]["cv"]}
    for r in recs:
        out.update({k: r[k] for k in ("val_loss", "val_bpb") if k in r})
    return out


def summarize(runs: dict[str, Path], seconds: float) -> str:
    lines = ["# megasink quickstart summary", "", f"wall time: {seconds / 60:.1f} min", ""]
    lines += ["| run | first loss | final loss | val loss | val bits/byte | per-layer CV |", "|---|---|---|---|---|---|"]
    for name, run_dir in runs.items():
        f = _final(run_dir)
        cv = " ".join(f"{c:.3f}" for c in f["cv"])
        lines.append(f"| {name} | {f['first_loss']:.3f} | {f['final_loss']:.3f} | {f.get('val_loss', float('nan')):.3f} "
                     f"| {f.get('val_bpb', float('nan')):.3f} | {cv} |")
    first = next(iter(runs.values()))
    lines += ["", f"heatmap: {first / 'importance.png'}", f"metrics: {first / 'metrics.jsonl'}",
              f"tensorboard: tensorboard --logdir {first.parent}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=".quickstart", help="folder for corpus, tokenizer and token shards")
    ap.add_argument("--runs", default="runs", help="folder for the run directories")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary size")
    ap.add_argument("--max-docs", type=int, default=6000, help="documents in the corpus")
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without the aux loss")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work, runs_root = REPO / args.work, REPO / args.runs
    corpus = build_corpus(work, args.max_docs)
    tokenizer, prefix = build_data(work, corpus, args.vocab)
    runs = {"sink + aux loss (1e-4)": runs_root / "quickstart-sink"}
    if not args.no_baseline:
        runs["sink, no aux loss"] = runs_root / "quickstart-sink-noaux"
    for name, run_dir in runs.items():
        train(run_dir, tokenizer, prefix, args.vocab, args.steps, 0.0 if "no aux" in name else 1e-4, args.nproc)
    summary = summarize(runs, time.perf_counter() - t0)
    (runs_root / "quickstart-sink" / "summary.md").write_text(summary)
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
