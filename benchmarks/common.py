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


# --------------------------------------------------------------------------- candidate kernel fix
# Benchmark-only: megasink.model.kernels is not edited. ``patched_flash()`` swaps the flash
# backend's autograd Function for one with the two changes RESULTS.md recommends, so their
# effect can be measured in the same run as the code as it is.


def shifted_out_backward(dout, q, k, v, out, lse, dlse, scale, mask, extras):
    """The flash backward with the lse gradient and no augmented column (None: cannot).

    The kernel uses ``out`` only for D = rowsum(dO * O), so passing
    O' = O - (dLSE / |dO|^2) dO (per row) gives D' = D - dLSE, and the kernel's own
    dS = P (dP - D') = P (dP - D + dLSE): exactly the gradient with the lse term, at the
    kernel's own head dim and with no padded copies. A row with dO = 0 and dLSE != 0 cannot
    be written this way: then the caller uses the augmented backward."""
    from megasink.model.kernels import _flash_bwd

    nrm = (dout * dout).sum(-1, keepdim=True)  # (B, nh, T, 1)
    if bool(((nrm < 1e-30) & (dlse[..., None] != 0)).any()):
        return None
    out_shifted = out.addcmul(dlse[..., None].to(out.dtype) / nrm, dout, value=-1.0)  # O' (B, nh, T, hd)
    return _flash_bwd(dout, q, k, v, out_shifted, lse, scale, mask, extras)


def _fixed_flash_function():
    import torch

    from megasink.model import kernels

    original = kernels.FlashAttentionLSE

    class FixedFlashAttentionLSE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale, mask):
            ctx.set_materialize_grads(False)  # fix 1: an unused lse arrives as None, not zeros
            out, lse, extras = kernels._flash_fwd(q, k, v, scale, mask)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale, ctx.mask, ctx.extras = scale, mask, extras
            return out, lse

        @staticmethod
        def backward(ctx, dout, dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
            if dlse is None:  # the stock kernel backward is exact
                dq, dk, dv = kernels._flash_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.mask, ctx.extras)
                return dq, dk, dv, None, None
            res = shifted_out_backward(dout, q, k, v, out, lse, dlse, ctx.scale, ctx.mask, ctx.extras)  # fix 2
            if res is None:
                return original.backward(ctx, dout, dlse)
            return (*res, None, None)

    return original, FixedFlashAttentionLSE


def _flash_attention_gqa(q, k, v, scale, seq):
    """kernels.flash_attention without the kv-head repeat and the .contiguous() copies: the
    CPU flash op and its backward take k, v with fewer heads (GQA) and strided inputs."""
    from megasink.model import kernels

    if q.device.type != "cpu":
        return kernels.flash_attention(q, k, v, scale, seq)
    mask = seq.additive_mask(q.dtype) if seq.doc_ids is not None else None
    return kernels.FlashAttentionLSE.apply(q, k, v, scale, mask)


class patched_flash:
    """Context manager: megasink's flash backend with the recommended fixes, in this process.

    fix 1 and 2: FixedFlashAttentionLSE above; fix 3 (``gqa=True``): no kv repeat, no copies."""

    def __init__(self, gqa: bool = True):
        self.gqa = gqa

    def __enter__(self):
        from megasink.model import kernels

        self.original, fixed = _fixed_flash_function()
        self.original_impl = kernels._IMPLS["flash"]
        kernels.FlashAttentionLSE = fixed
        if self.gqa:
            kernels._IMPLS["flash"] = _flash_attention_gqa
        return self

    def __exit__(self, *exc):
        from megasink.model import kernels

        kernels.FlashAttentionLSE = self.original
        kernels._IMPLS["flash"] = self.original_impl
        return False


class stub_vanilla_gate:
    """Context manager (attribution only, results are wrong inside): the vanilla gate
    1 - exp(s0 - lse) replaced by zeros, to measure what computing it in every forward costs."""

    def __enter__(self):
        from megasink.model import attention

        self.original = attention.vanilla_gate
        attention.vanilla_gate = lambda q, k, lse, seq, scale: lse.detach().new_zeros(lse.shape)
        return self

    def __exit__(self, *exc):
        from megasink.model import attention

        attention.vanilla_gate = self.original
        return False
