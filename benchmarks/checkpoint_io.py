#!/usr/bin/env python
"""Sharded vs unsharded checkpoints: save and load time, and host memory per rank during a save.

What it does: on ``--world`` gloo ranks (torch.multiprocessing.spawn, CPU) it builds the model
of ``--config`` (default the repository's 0.6b config, 0.48B parameters, fp32) in the layout
given (``--tp``, ``--zero``; dp = world / tp), wraps it in the DeepSpeed engine as training
does (megasink.parallel.parallelize), gives AdamW random moments (no training step: the
state a save meets is the same), and then, ``--reps`` rounds, each alternating the order:

- saves the unsharded format (``save_training_state(..., sharded=False)``: full tensors
  gathered and written by one rank, the format before sharding) and the sharded format;
- evicts both checkpoints from the page cache (``posix_fadvise DONTNEED``), so loads read the
  disk, and loads each into the same engine (``load_training_state``), checking that the
  loaded weights and moments equal the saved ones.

Per rank it records wall time (from a barrier to the end of the collective call), the peak
resident memory above the resident memory before the call (VmHWM after resetting it through
``/proc/self/clear_refs``, freed heap returned to the system first with ``malloc_trim``), and for the sharded save the bytes the rank wrote (its shard).
The issue's bound for a save: peak extra memory <= own shard + the largest single tensor
(full, fp32). Afterwards, in fresh processes, the HF export of the sharded checkpoint
(``convert_checkpoint``, streaming tensor by tensor) against loading the model first and
exporting it (``export_model``): peak resident memory of each process.

Times are per rank, the slowest rank counts (a save ends when every rank has written);
ratios are per round, median over rounds (benchmarks/common.py's protocol).

    python benchmarks/checkpoint_io.py                            # tp=2, 2 ranks, 0.48B, ~2.5 min, ~19 GB
    python benchmarks/checkpoint_io.py --world 4 --tp 2 --zero 1 --formats sharded --no-export
    python benchmarks/checkpoint_io.py --config configs/tiny-sink.yaml --reps 1   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, machine_line, median, table

MB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="configs/0.6b-sink.yaml")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--formats", default="unsharded,sharded", help="which formats to save and load")
    p.add_argument("--dir", help="where to write the checkpoints (default: a temp dir, removed after)")
    p.add_argument("--no-export", action="store_true", help="skip the HF export measurement")
    p.add_argument("--json", help="also write the records to this JSON file")
    return p.parse_args(argv)


def overrides(args, run_dir: str) -> list[str]:
    return ["train.precision=fp32", "data.tokenizer=", f"parallel.tp={args.tp}", f"parallel.zero_stage={args.zero}",
            "parallel.pp=1", "train.activation_checkpointing=false", "model.attention_backend=eager",
            f"train.global_batch_size={args.world // args.tp * 4}", "train.micro_batch_size=4",
            f"run_dir={run_dir}"]


# --------------------------------------------------------------------------- memory
def rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measured(fn):
    """(seconds, peak resident MB above the start) of fn(); peak from VmHWM, reset first. Memory the
    allocator kept from earlier calls is returned to the system first (malloc_trim), so that what
    fn() allocates shows as new resident memory and every call starts alike."""
    import ctypes

    import torch.distributed as dist

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = rss_kb()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (rss_kb("VmHWM") - start) / 1024


def evict(directory: Path) -> None:
    """Drop a checkpoint's (clean, fsynced) pages from the page cache."""
    for p in directory.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- worker
def _state_fingerprint(engine, named) -> list:
    """Per parameter: the sums of this rank's fp32 master and moments (what a load must restore)."""
    from megasink.parallel import engine as eng

    return [[float(eng.local_master(engine, p, k).double().sum()) for k in (None, "exp_avg", "exp_avg_sq")]
            for _, p, _ in named]


def worker(rank, world, port, args, out_dir, base):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megasink.config import load_config
    from megasink.model.transformer import Transformer
    from megasink.parallel import engine as eng
    from megasink.parallel.dims import init_distributed
    from megasink.parallel.parallelize import parallelize
    from megasink.train import state as train_state

    cfg = load_config(args.config, overrides(args, str(Path(base) / "unused")))
    dims = init_distributed(cfg)
    torch.manual_seed(0)
    pm = parallelize(Transformer(cfg.model, cfg.aux_loss), cfg, dims)
    engine = pm.engine
    eng.ensure_optimizer_state(engine)
    eng.set_optimizer_step_count(engine, 1)
    eng.relink_optimizer_states(engine)
    named = train_state._named_params(engine, dims)
    gen = torch.Generator().manual_seed(0)  # replicas (over TP, or dp without ZeRO) hold equal state
    for _, p, _ in named:  # moments as after some training: random, exp_avg_sq positive
        for key in ("exp_avg", "exp_avg_sq"):
            v = eng.local_master(engine, p, key)
            v.copy_(torch.rand(v.shape, generator=gen) if key == "exp_avg_sq" else torch.randn(v.shape, generator=gen))
    before = _state_fingerprint(engine, named)
    with torch.device("meta"):
        largest = max(p.numel() for p in Transformer(cfg.model, cfg.aux_loss).parameters()) * 4
    formats = args.formats.split(",")
    rec = {"rank": rank, "largest_tensor_mb": largest / MB, "rounds": []}
    for r in range(args.reps):
        order = formats if r % 2 == 0 else formats[::-1]
        round_rec = {}
        for fmt in order:
            cfg.run_dir = str(Path(base) / fmt)
            save = lambda: train_state.save_training_state(engine, cfg, dims, r + 1, {}, 1,  # noqa: E731
                                                           pm.shared_heads, sharded=fmt == "sharded")
            round_rec[f"save_{fmt}"] = measured(save)
            d = Path(cfg.run_dir) / "checkpoints" / f"step_{r + 1}"
            if fmt == "sharded":
                round_rec["shard_mb"] = sum((d / f).stat().st_size for f in d.glob(f"*-rank{rank:05d}-*")) / MB
        dist.barrier()
        for fmt in order:
            d = Path(base) / fmt / "checkpoints" / f"step_{r + 1}"
            evict(d)
            dist.barrier()
            round_rec[f"load_{fmt}"] = measured(lambda: train_state.load_training_state(engine, d, dims))
            assert _state_fingerprint(engine, named) == before, f"rank {rank}: {fmt} load changed the state"
        rec["rounds"].append(round_rec)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.barrier()
    del engine, pm, named  # the engine goes before the process groups it holds
    gc.collect()
    dist.destroy_process_group()


EXPORT = """
import sys, json, time
sys.path.insert(0, {root!r})
from megasink.hf.export import convert_checkpoint, export_model
t0 = time.perf_counter()
if {streaming}:
    convert_checkpoint({ckpt!r}, {out!r}, progress=False, overwrite=True)
else:
    import megasink
    model, cfg = megasink.load_checkpoint({ckpt!r})
    export_model(model, cfg, {out!r}, progress=False, overwrite=True)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_mb": peak / 1024}}))
"""


def export_peaks(ckpt: Path, out: Path) -> dict:
    """Peak resident MB (whole process, imports included) and seconds of the two HF export routes."""
    res = {}
    for name, streaming in (("load + export_model", False), ("convert_checkpoint (streaming)", True),
                            ("torch import only", None)):
        code = ("import sys, json; import torch, transformers; peak = next(int(l.split()[1]) for l in "
                "open('/proc/self/status') if l.startswith('VmHWM:')); print(json.dumps({'seconds': 0, "
                "'peak_mb': peak / 1024}))") if streaming is None else EXPORT.format(
                    root=ROOT, streaming=streaming, ckpt=str(ckpt), out=str(out))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def report(args, recs, exports) -> str:
    formats = args.formats.split(",")
    lines = [f"{args.config}, world {args.world}, tp {args.tp}, dp {args.world // args.tp}, ZeRO-{args.zero}, "
             f"fp32, {args.reps} round(s); {machine_line()}"]
    rows = []
    for kind in ("save", "load"):
        for fmt in formats:
            slowest = [max(rec["rounds"][i][f"{kind}_{fmt}"][0] for rec in recs) for i in range(args.reps)]
            peaks = [max(rec["rounds"][i][f"{kind}_{fmt}"][1] for rec in recs) for i in range(args.reps)]
            rows.append([kind, fmt, f"{median(slowest):.2f}", f"{max(peaks):.0f}"])
    lines.append(table(["", "format", "s (slowest rank, median)", "peak extra MB (worst rank)"], rows))
    if len(formats) == 2:
        for kind in ("save", "load"):
            ratios = [max(rec["rounds"][i][f"{kind}_sharded"][0] for rec in recs) /
                      max(rec["rounds"][i][f"{kind}_unsharded"][0] for rec in recs) for i in range(args.reps)]
            lines.append(f"{kind} time sharded / unsharded: {median(ratios):.2f} (per round: "
                         f"{', '.join(f'{x:.2f}' for x in ratios)})")
    if "sharded" in formats:
        rows = []
        for rec in recs:
            shard = rec["rounds"][0]["shard_mb"]
            peak = max(rd["save_sharded"][1] for rd in rec["rounds"])
            bound = shard + rec["largest_tensor_mb"]
            rows.append([rec["rank"], f"{shard:.0f}", f"{rec['largest_tensor_mb']:.0f}", f"{peak:.0f}",
                         f"{bound:.0f}", "yes" if peak <= bound else "NO"])
        lines.append(table(["rank", "own shard MB", "largest tensor MB", "peak extra MB in sharded save",
                            "bound MB", "within"], rows))
    if exports:
        lines.append(table(["HF export route", "s", "peak RSS MB (process)"],
                           [[k, f"{v['seconds']:.1f}", f"{v['peak_mb']:.0f}"] for k, v in exports.items()]))
    return "\n\n".join(lines)


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt_io_"))
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(args.world, free_port(), args, out_dir, str(base)), nprocs=args.world, join=True)
        recs = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(args.world)]
    exports = None
    if not args.no_export and "sharded" in args.formats.split(","):
        step = base / "sharded" / "checkpoints" / f"step_{args.reps}"
        exports = export_peaks(step, base / "hf")
    text = report(args, recs, exports)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"records": recs, "exports": exports, "report": text}, indent=2))
    if not args.dir:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
