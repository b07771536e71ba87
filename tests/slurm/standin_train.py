"""A stand-in for ``python -m megasink.train`` that follows the trainer's Slurm contract.

Used to check the Slurm plumbing (rendezvous, signal delivery, checkpoint-and-requeue,
failure propagation) without the real model: run it with ``MEGASINK_MODULE=standin_train``
and ``PYTHONPATH=tests/slurm``. It reads the config through megasink.config like the
trainer, then per step sleeps ``STANDIN_STEP_S`` seconds and all-reduces a fake loss
(gloo). Contract followed:

- run_dir/config.yaml, run_dir/metrics.jsonl ({"step", "loss", ...} per logged step),
  run_dir/checkpoints/step_N/ and run_dir/checkpoints/latest (written last, atomically);
- train.resume=auto resumes from latest and removes run_dir/PREEMPTED;
- SIGUSR1/SIGTERM on any rank sets a flag; at the next step boundary the ranks agree
  (all-reduce MAX), save, write run_dir/PREEMPTED (the step) and exit 0;
- parallel.timeout_s is the collective timeout.
Extra: ``STANDIN_CRASH_RANK=R`` makes rank R exit(3) at step ``STANDIN_CRASH_STEP``.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from megasink.config import load_config, save_config
from megasink.utils import atomic_write_text

_stop = False


def _on_signal(signum, frame):
    global _stop
    _stop = True
    print(f"standin rank {os.environ.get('RANK')}: got signal {signum}", flush=True)


def _save(run_dir: str, step: int, rank: int) -> None:
    if rank == 0:
        ckpt = os.path.join(run_dir, "checkpoints", f"step_{step}")
        os.makedirs(ckpt, exist_ok=True)
        atomic_write_text(os.path.join(ckpt, "state.json"), json.dumps({"step": step}))
        atomic_write_text(os.path.join(run_dir, "checkpoints", "latest"), f"step_{step}\n")
    dist.barrier()


def main(argv: list[str]) -> int:
    cfg = load_config(argv[0], argv[1:])
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = cfg.run_dir
    start = 0
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if cfg.train.resume == "auto" and os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        with open(os.path.join(run_dir, "checkpoints", name, "state.json")) as f:
            start = json.load(f)["step"]
        print(f"standin rank {rank}: resumed from {name}", flush=True)
    dist.barrier()
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        if os.path.exists(os.path.join(run_dir, "PREEMPTED")):
            os.remove(os.path.join(run_dir, "PREEMPTED"))
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.2"))
    crash_rank = int(os.environ.get("STANDIN_CRASH_RANK", "-1"))
    crash_step = int(os.environ.get("STANDIN_CRASH_STEP", "3"))
    for step in range(start + 1, cfg.train.steps + 1):
        time.sleep(step_s)
        if rank == crash_rank and step == crash_step:
            print(f"standin rank {rank}: crashing at step {step}", flush=True)
            os._exit(3)
        loss = torch.tensor([10.0 / step])
        dist.all_reduce(loss)  # (1,) sum over ranks
        if rank == 0 and step % cfg.train.log_interval == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item() / world, "aux_loss": 0.0,
                                    "lr": cfg.train.lr, "world_size": world,
                                    "host": os.uname().nodename}) + "\n")
        if cfg.train.save_interval and step % cfg.train.save_interval == 0:
            _save(run_dir, step, rank)
        flag = torch.tensor([1 if _stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # (1,) any rank signalled
        if flag.item():
            _save(run_dir, step, rank)
            if rank == 0:
                atomic_write_text(os.path.join(run_dir, "PREEMPTED"), f"{step}\n")
            print(f"standin rank {rank}: checkpointed at step {step} on signal, exiting", flush=True)
            dist.destroy_process_group()
            return 0
    _save(run_dir, cfg.train.steps, rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
