"""Shared helpers for the benchmarks: thread setup, interleaved A/B timing, tables.

Timing protocol (all benchmarks): every case gets ``warmup`` untimed calls, then
``reps`` rounds; in each round every case runs once, in an order that rotates from round
to round, so slow drift of a shared, noisy machine hits all cases alike. A case's time is
the median over rounds; a ratio A/B is the median of the per-round ratios (each round's
A and B ran back to back), which is more robust to load bursts than a ratio of medians.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def set_threads(n: int) -> None:
    """Pin intra-op threads (and OMP/MKL) to n before torch does any work."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    import torch

    torch.set_num_threads(n)


def machine_line() -> str:
    """One line: CPU model, cores, threads, torch build, current load average."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads, load average {load}")


class Timings(dict):
    """{case: [seconds per round]} on the chosen clock; ``.wall`` holds the wall-clock times."""

    wall: Dict[str, List[float]]


def interleaved(cases: Dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                clock: str = "wall") -> Timings:
    """Time each zero-argument callable `reps` times, interleaved; -> {name: [seconds]}.

    clock: ``wall`` (perf_counter) or ``cpu`` (this process's CPU time, process_time: with
    one compute thread it is the step's time on the core it got, leaving out the time the
    process waits descheduled on a shared machine; with several threads it adds them up,
    spin-waits included, so use it with one thread)."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    times, wall = Timings({n: [] for n in names}), {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:  # rotate the order every round
            w0, c0 = time.perf_counter(), time.process_time()
            cases[n]()
            c1, w1 = time.process_time(), time.perf_counter()
            times[n].append(c1 - c0 if clock == "cpu" else w1 - w0)
            wall[n].append(w1 - w0)
    times.wall = wall
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i] (a and b from the same `interleaved` call)."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(xs: Sequence[float]) -> float:
    """Half the interquartile range relative to the median: a rough noise figure."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(xs)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats printed as given (format them before)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt(r) for r in cells[1:]])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def bootstrap_ci(xs: Sequence[float], stat: Callable = statistics.median, n: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple:
    """(low, high) percentile-bootstrap interval of `stat` over xs."""
    import random

    rng = random.Random(seed)
    xs = list(xs)
    vals = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(n))
    lo = vals[int((1 - level) / 2 * n)]
    hi = vals[min(n - 1, int((1 + level) / 2 * n))]
    return lo, hi


def packed_doc_ids(batch: int, seq_len: int, mean_doc_len: int, seed: int = 0):
    """(B, T) int64 document ids of packed documents with random lengths (mean ~mean_doc_len),
    like the training loader's synthetic data; deterministic for a seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_doc_len  # (B, T) document starts
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)  # (B, T), non-decreasing, 0 at t = 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
