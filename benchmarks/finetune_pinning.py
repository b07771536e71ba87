"""Fine-tuning with and without the shared/routed split: does balancing pin dormant heads?

Starting from the sink-attention model that `make quickstart` pretrains *without* the aux
loss (runs/quickstart-sink-noaux: its top layers' heads have collapsed), three short
fine-tuning runs on the same data, in one command:
  * plain:   aux_loss.coef 0 (reference);
  * all-routed: aux_loss.coef 1e-2, every head in the CV;
  * shared-m: aux_loss.coef 1e-2, the top-m heads per layer (measured on the starting model
    at step 0) shared and left out of the CV.
benchmarks/reproduce_small.py runs the same experiment as part of its sweep (one process).
Printed per run: routed-head CV (mean over layers), the mean gate ("importance") of the
starting model's dormant heads (megasink/heatmap.py's definition; a layer without one
contributes its least important head, as in benchmarks/reproduce_report.py), and validation
loss. Without the split, the CV term can only lower
the CV by lifting dormant heads' gates (pinning them on) or pushing the strong heads down;
with the dominant heads shared, the routed heads are balanced among themselves.

    make quickstart && python benchmarks/finetune_pinning.py [--steps 120] [--m 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_report import formerly_dormant  # noqa: E402  (benchmarks/ is not a package)


def start_importance(base: Path, data_prefix: str, batches: int = 8) -> torch.Tensor:
    """(L, H) importance of the starting model on validation batches."""
    import megasink
    from megasink.data import build_dataset, iter_validation_batches

    model, cfg = megasink.load_checkpoint(base)
    cfg.data.path = [data_prefix]
    ds = build_dataset(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.train.seed, split="valid")
    sums, count = 0.0, 0.0
    with torch.no_grad():
        for b in iter_validation_batches(ds, 8, batches, 0, 1):
            out = model(b["tokens"], b["doc_ids"])
            sums, count = sums + out.gate_sums, count + out.gate_count
    return sums / count


def finetune(name: str, base: Path, overrides: list[str], steps: int, runs: Path) -> Path:
    run_dir = runs / f"finetune-pinning-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megasink.train", "configs/finetune-sink.yaml", f"train.init_from={base}", f"run_dir={run_dir}",
           f"train.steps={steps}", f"train.importance_interval={steps}", f"train.eval_interval={steps}",
           "train.resume=none", "train.progress=false", *overrides]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run_dir


def summarize(run_dir: Path, dormant: torch.Tensor) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in recs if "importance" in r][-1]
    imp = torch.tensor(last["importance"])
    val = [r["val_loss"] for r in recs if "val_loss" in r][-1]
    return {"routed_cv": sum(last["cv"]) / len(last["cv"]), "dormant_gate": float(imp[dormant].mean()),
            "all_gate": float(imp.mean()), "val_loss": val}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/quickstart-sink-noaux/checkpoints", help="pretrained megasink checkpoint")
    ap.add_argument("--data", default=".quickstart/tokens/pydoc", help="token prefix (train + _valid)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--m", type=int, default=2, help="shared heads per layer")
    ap.add_argument("--runs", default="runs")
    args = ap.parse_args(argv)
    base = REPO / args.base
    if not base.exists():
        print(f"{base} not found: run `make quickstart` first", file=sys.stderr)
        return 2
    imp0 = start_importance(base, str(REPO / args.data))
    dormant = torch.tensor(formerly_dormant(imp0.tolist()))  # (L, H) bool
    data = [f"data.path=[{REPO / args.data}]"]
    plans = {"plain": ["aux_loss.coef=0", "aux_loss.shared_heads=0"],
             "all-routed": ["aux_loss.coef=0.01", "aux_loss.shared_heads=0"],
             f"shared-{args.m}": ["aux_loss.coef=0.01", f"aux_loss.shared_heads={args.m}"]}
    results = {name: summarize(finetune(name, base, data + ov, args.steps, REPO / args.runs), dormant)
               for name, ov in plans.items()}
    print(f"\nstarting model: mean importance {float(imp0.mean()):.4f}, dormant heads ({int(dormant.sum())}) "
          f"{float(imp0[dormant].mean()):.4f}, per-layer CV "
          + " ".join(f"{float(c):.3f}" for c in (imp0.std(-1, unbiased=False) / imp0.mean(-1))))
    print("| run | routed-head CV (mean over layers) | dormant heads' mean gate | all heads' mean gate | val loss |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['routed_cv']:.4f} | {r['dormant_gate']:.4f} | {r['all_gate']:.4f} | {r['val_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
