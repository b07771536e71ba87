"""``make quickstart``: the whole workflow on real text, on one CPU machine, in minutes.

1. a small real-English corpus from a package on disk (the Python documentation sources of
   Debian's python3.X-doc, else the standard library's docstrings), written as FineWeb-Edu
   parquet;
2. a sentencepiece tokenizer (tools/train_tokenizer.py);
3. Megatron-format token shards with a held-out split (tools/preprocess_data.py);
4. a small sink-attention model (configs/quickstart-sink.yaml, a regime where heads
   collapse) trained with the aux loss (lambda 1e-2) and without it, side by side, one
   process each;
5. a summary: final loss, validation loss and bits-per-byte, per-layer CV and dormant heads
   of both runs, what their difference means, and a heatmap of both runs' importance.

Each stage is skipped when its output already exists (delete .quickstart/ to redo); a run
that already reached its last step is reused, and the summary says so; a run directory trained
with other settings is moved aside, never resumed.
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


CONFIG = REPO / "configs" / "quickstart-sink.yaml"
AUX_COEF = 1e-2  # lambda of the aux run (from scratch at this size, 1e-4 changes nothing visible)


def run_overrides(run_dir: Path, tokenizer: Path, prefix: Path, steps: int, coef: float, vocab: int = 2048) -> list[str]:
    return [f"run_dir={run_dir}", f"data.path=[{prefix}]", f"data.tokenizer={tokenizer}", f"model.vocab_size={vocab}",
            f"train.steps={steps}", f"aux_loss.coef={coef}", f"train.importance_interval={steps}",
            f"train.eval_interval={steps}", "train.resume=auto"]


def set_aside_stale(run_dir: Path, overrides: list[str]) -> None:
    """A run directory left by other settings (an older quickstart) is renamed, never resumed."""
    import yaml

    from megasink.config import config_to_dict, load_config

    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    wanted = yaml.safe_load(yaml.safe_dump(config_to_dict(load_config(CONFIG, overrides))))
    if yaml.safe_load(saved.read_text()) == wanted:
        return
    n = 1
    while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.stale-{n}")
    run_dir.rename(aside)
    print(f"{run_dir} was trained with other settings (an older quickstart?): moved to {aside}, starting afresh")


def finished(run_dir: Path, steps: int) -> bool:
    """Has the run in run_dir reached step ``steps``: its checkpoint of that step and its metrics?"""
    from megasink.checkpoint import newest_complete, step_dir_name

    ckpt = newest_complete(run_dir / "checkpoints")
    return ckpt is not None and ckpt.name == step_dir_name(steps) and _last_step(run_dir) >= steps


def train_concurrently(runs: dict[str, tuple[Path, list[str]]]) -> None:
    """The runs side by side, one single-threaded process each (one per core of a 2-core box)."""
    procs = []
    for run_dir, overrides in runs.values():
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "megasink.train", str(CONFIG.relative_to(REPO)), *overrides]
        print("+ " + " ".join(cmd) + f"  > {run_dir / 'train.log'}", flush=True)
        log = open(run_dir / "train.log", "a")
        procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}), run_dir, log))
    while any(p.poll() is None for p, _, _ in procs):
        time.sleep(20)
        print("  " + " | ".join(f"{name}: step {_last_step(rd)}" for name, (rd, _) in runs.items()), flush=True)
    for p, run_dir, log in procs:
        log.close()
        if p.returncode:
            print((run_dir / "train.log").read_text()[-3000:], file=sys.stderr)
            raise subprocess.CalledProcessError(p.returncode, p.args)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _final(run_dir: Path) -> dict:
    from megasink.heatmap import dormant_count

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_recs = [r for r in recs if "loss" in r]
    out = {"first_loss": train_recs[0]["loss"], "final_loss": train_recs[-1]["loss"], "cv": train_recs[-1]["cv"]}
    out["importance"] = [r["importance"] for r in train_recs if "importance" in r][-1]
    out["dormant"] = dormant_count(out["importance"])
    for r in recs:
        out.update({k: r[k] for k in ("val_loss", "val_bpb") if k in r})
    return out


def difference(aux: dict, noaux: dict) -> list[str]:
    """The aux-vs-no-aux difference in numbers, and one sentence on what it means."""
    from megasink.heatmap import DORMANT

    a, b = max(aux["cv"]), max(noaux["cv"])
    layer = noaux["cv"].index(b)
    lines = [f"largest per-layer CV: {b:.3f} without the aux loss (layer {layer}) vs {a:.3f} with it "
             f"({b / max(a, 1e-9):.1f}x); dormant heads (importance < {DORMANT} x layer mean): {noaux['dormant']} vs "
             f"{aux['dormant']}; val loss {noaux.get('val_loss', float('nan')):.3f} vs {aux.get('val_loss', float('nan')):.3f}."]
    dv = aux.get("val_loss", float("nan")) - noaux.get("val_loss", float("nan"))
    cost = f"validation loss {'+' if dv >= 0 else '-'}{abs(dv):.3f} with it"
    if b >= 2 * a or noaux["dormant"] > aux["dormant"]:
        lines.append("What it means: without the aux loss a few heads of the top layers take over while the others "
                     "close their gates (head collapse: those heads stop contributing); the CV² loss keeps every "
                     f"head of a layer in use ({cost}).")
    else:
        lines.append("The two runs do not differ clearly this time (fewer steps or another seed?): the collapse this "
                     "quickstart is set up to show did not appear.")
    return lines


def timing(seconds: float, reused: list[str], runs: dict[str, Path]) -> str:
    """The summary's line on time: how long this command took, and which runs it did not train."""
    if not reused:
        return f"wall time: {seconds / 60:.1f} min"
    dirs = " ".join(str(runs[name]) for name in reused)
    again = f"(delete {dirs} to train {'it' if len(reused) == 1 else 'them'} again)"
    if len(reused) == len(runs):
        return f"reused the finished runs, trained by an earlier `make quickstart`; nothing was trained now {again}"
    return f"wall time: {seconds / 60:.1f} min; reused the finished run {', '.join(reused)} {again}"


def summarize(runs: dict[str, Path], seconds: float, reused: list[str] = ()) -> str:
    from megasink.heatmap import Panel, save_importance_panels

    finals = {name: _final(run_dir) for name, run_dir in runs.items()}
    lines = ["# megasink quickstart summary", "", timing(seconds, list(reused), runs), ""]
    lines += ["| run | first loss | final loss | val loss | val bits/byte | per-layer CV | dormant heads |",
              "|---|---|---|---|---|---|---|"]
    for name, f in finals.items():
        cv = " ".join(f"{c:.3f}" for c in f["cv"])
        lines.append(f"| {name} | {f['first_loss']:.3f} | {f['final_loss']:.3f} | {f.get('val_loss', float('nan')):.3f} "
                     f"| {f.get('val_bpb', float('nan')):.3f} | {cv} | {f['dormant']} |")
    first = next(iter(runs.values()))
    if len(finals) == 2:
        lines += [""] + difference(*finals.values())
    heatmap = save_importance_panels([Panel(name, f["importance"], f["cv"]) for name, f in finals.items()],
                                     first / "importance_compare.png", "head importance at the end of training")
    lines += ["", f"heatmap (both runs, colour = importance / layer mean): {heatmap}",
              f"metrics: {first / 'metrics.jsonl'}",
              "commands (megasink, tensorboard, python tools/...) run inside the environment: "
              "source .venv/bin/activate",
              f"tensorboard: tensorboard --logdir {first.parent}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=".quickstart", help="folder for corpus, tokenizer and token shards")
    ap.add_argument("--runs", default="runs", help="folder for the run directories")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary size")
    ap.add_argument("--max-docs", type=int, default=6000, help="documents in the corpus")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without the aux loss")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work, runs_root = REPO / args.work, REPO / args.runs
    corpus = build_corpus(work, args.max_docs)
    tokenizer, prefix = build_data(work, corpus, args.vocab)
    names = {f"sink + aux loss ({AUX_COEF:g})": (runs_root / "quickstart-sink", AUX_COEF)}
    if not args.no_baseline:
        names["sink, no aux loss"] = (runs_root / "quickstart-sink-noaux", 0.0)
    runs = {name: (rd, run_overrides(rd, tokenizer, prefix, args.steps, coef, args.vocab))
            for name, (rd, coef) in names.items()}
    for run_dir, overrides in runs.values():
        set_aside_stale(run_dir, overrides)
    reused = [name for name, (rd, _) in runs.items() if finished(rd, args.steps)]
    for name in reused:
        print(f"{runs[name][0]}: reached step {args.steps} in an earlier run: reused, not trained again")
    train_concurrently({name: run for name, run in runs.items() if name not in reused})
    summary = summarize({name: rd for name, (rd, _) in runs.items()}, time.perf_counter() - t0, reused)
    (runs_root / "quickstart-sink" / "summary.md").write_text(summary)
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
