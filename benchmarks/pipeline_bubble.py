"""Pipeline bubble: measured step time under pp=2 (1F1B) against the ideal (p-1)/(m+p-1).

For each micro-batch count m the same model trains for a few steps twice, in one run:
  * pp=1 on one process: t_mb = step time / m, the time of one micro-batch through the
    whole model; one stage of a p-way split ideally takes t_stage = t_mb / p;
  * pp=p on p processes (one thread each, gloo): step time T_p(m).
Ideal 1F1B step time: (m + p - 1) * t_stage, so ideal bubble fraction (p-1)/(m+p-1).
Measured bubble fraction: 1 - m * t_stage / T_p(m). The ratio measured/ideal shows how much
of the pipeline overhead is the schedule's bubble (1.0) versus communication and DeepSpeed
bookkeeping (> 1). The aux loss is off (coef 0) so only the schedule is measured.

    python benchmarks/pipeline_bubble.py [--micro-batches 1 2 4 8] [--steps 6] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dist_utils import run_distributed  # noqa: E402
from train_utils import train_worker  # noqa: E402

MODEL = ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4", "model.seq_len=256",
         "model.vocab_size=1024", "aux_loss.coef=0", "train.progress=false", "train.log_interval=1",
         "train.warmup_steps=1", "train.resume=none", "train.micro_batch_size=4", "parallel.zero_stage=1"]


def step_time(run_dir: Path, tokens_per_step: int, skip: int) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [tokens_per_step / r["tokens_per_s"] for r in recs if "tokens_per_s" in r][skip:]
    return statistics.median(times)


def measure(tmp: Path, pp: int, m: int, steps: int) -> float:
    run_dir = tmp / f"pp{pp}_m{m}"
    gbs = 4 * m
    run_distributed(train_worker, pp, "configs/tiny-sink.yaml",
                    MODEL + [f"run_dir={run_dir}", f"train.steps={steps}", f"train.global_batch_size={gbs}",
                             f"parallel.pp={pp}"])
    return step_time(run_dir, gbs * 256, skip=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first 2 are warm-up)")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="m in {1, 4}, 4 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.micro_batches, args.steps = [1, 4], 4
    p = args.pp
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.micro_batches:
            t1 = measure(Path(tmp), 1, m, args.steps)
            tp = measure(Path(tmp), p, m, args.steps)
            t_stage = t1 / m / p
            ideal = (p - 1) / (m + p - 1)
            measured = 1 - m * t_stage / tp
            rows.append((m, t1, tp, ideal, measured, (m + p - 1) * t_stage / tp))
    print(f"\npp={p}, 1F1B (DeepSpeed PipelineEngine), gloo, 1 thread per process")
    print("| m | pp=1 step (s) | pp=2 step (s) | ideal bubble | measured bubble | measured/ideal | ideal/measured time |")
    print("|---|---|---|---|---|---|---|")
    for m, t1, tp, ideal, measured, eff in rows:
        print(f"| {m} | {t1:.3f} | {tp:.3f} | {ideal:.3f} | {measured:.3f} | {measured / ideal:.2f} | {eff:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
