"""Run a function on N gloo ranks in fresh processes (torch.multiprocessing.spawn).

Each rank gets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK in its environment, runs
``fn(rank, world_size, *args)``, and returns its result by pickle through a temp dir.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args):
    """-> list of per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def init_gloo(rank: int, world_size: int):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
