"""Fused CPU loops for the vanilla gate's per-token work and the flash backward's O shift (numba).

The vanilla gate needs, per token t and query head h, s0 = q[t, h] . k[first(t), kv(h)] (the
score on its document's first key), and in the backward dq[t, h] += w k[first(t), kv(h)] and
dk[first(t), kv(h)] += w q[t, h]. As PyTorch ops that is a gathered copy of k plus ~6 passes
over (B, T, nh, hd), each as slow as ~1/20 of the layer's matmuls at d_model 128: ~5 % of a
tiny model's training step. Here each is one loop over q in the token-major memory that the
projections and the CPU flash kernel already use.

Optional: used for fp32 / fp64 CPU tensors whose token-major (B, T, n, ...) views are
contiguous (the model's q, k, out and gradients are), when numba is installed; everywhere else
the callers' PyTorch code runs (tests check both against each other). The loops are compiled on
first use for those two dtypes (~2 s, then cached next to this file or in numba's user cache);
if numba fails to import or compile, a warning says so and the PyTorch code runs.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

enabled = importlib.util.find_spec("numba") is not None  # False: always the PyTorch code
_kernels = None  # (logits, grads, shift, restore) once compiled


def usable(*big: torch.Tensor) -> bool:
    """Can the loops run on these (B, n, T[, d]) tensors: CPU, all fp32 or all fp64, each
    contiguous in token-major order? Compiles the loops on the first call that says yes."""
    dtype = big[0].dtype
    if not enabled or dtype not in (torch.float32, torch.float64):
        return False
    if not all(t.device.type == "cpu" and t.dtype == dtype and t.transpose(1, 2).is_contiguous() for t in big):
        return False
    return _load() is not None


def _load():
    global enabled, _kernels
    if _kernels is None and enabled:
        try:
            try:
                _kernels = _compile(cache=True)
            except RuntimeError:  # no writable cache location (read-only install): compile per process
                _kernels = _compile(cache=False)
        except Exception as e:  # a broken numba install must not stop training: PyTorch ops instead
            enabled = False
            warnings.warn(f"megasink: numba loops unavailable ({type(e).__name__}: {e}); using PyTorch ops")
    return _kernels


def _tm(x: torch.Tensor):
    """(B, n, T[, d]) -> numpy view in (B, T, n[, d]) order; copies only tensors that are not
    token-major contiguous (callers pass only small (B, n, T) ones here)."""
    return x.detach().transpose(1, 2).contiguous().numpy()


def _first(first_idx, B: int, T: int):
    return (torch.zeros(B, T, dtype=torch.long) if first_idx is None else first_idx.contiguous()).numpy()


def log_first_weight(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, first_idx, scale: float) -> torch.Tensor:
    """q (B, nh, T, hd), k (B, nkv, T, hd), lse (B, nh, T) -> (B, nh, T):
    q[t] . k[first(t)] * scale - lse[t]. ``first_idx`` (B, T), None: every token's first key is 0."""
    B, nh, T, _ = q.shape
    x = torch.empty(B, T, nh, dtype=q.dtype)
    _kernels[0](_tm(q), _tm(k), _first(first_idx, B, T), _tm(lse), scale, x.numpy())  # numba casts the float
    return x.transpose(1, 2)


def _factors(g, like: torch.Tensor):
    """(head (nh,), token (B, T), elem (B, T, nh)) numpy arrays of a (B, nh, T) gradient given
    as a tensor or a kernels.FactoredGrad (duck-typed: this module imports nothing of megasink)."""
    if isinstance(g, torch.Tensor):
        B, nh, T = g.shape
        head, token, elem = torch.ones(nh, dtype=like.dtype), torch.ones(B, T, dtype=like.dtype), g
    else:
        head, token, elem = g
    head, token = (x.detach().to(like.dtype).contiguous().numpy() for x in (head, token))
    return head, token, _tm(elem.to(like.dtype))


def add_first_key_grads_(dq, dk, q, k, w, first_idx) -> None:
    """In place: dq[t, h] += w[t, h] k[first(t), kv(h)], dk[first(t), kv(h)] += w[t, h] q[t, h].
    w (B, nh, T), a tensor or a kernels.FactoredGrad."""
    B, nh, T, _ = q.shape
    _kernels[1](_tm(q), _tm(k), _first(first_idx, B, T), *_factors(w, q), _tm(dq), _tm(dk))


def shift_first_column_(out: torch.Tensor, dout: torch.Tensor, dlse):
    """kernels._shift_out in place: O[:, 0] -= dLSE / dO[:, 0] in every row with dLSE != 0, and
    the original column (B, nh, T) returned for ``restore_first_column_``; None (and out
    untouched) when a shift is not finite or would exceed a quarter of the dtype's range.
    dlse (B, nh, T), a tensor or a kernels.FactoredGrad.

    In place, through numpy, so torch's version counter of ``out`` does not move: the caller
    runs the kernel backward on the shifted tensor and restores it bitwise (try/finally) before
    its autograd node returns. Safe because CPU autograd runs that node alone on the calling
    thread: no other op can read ``out`` while it is shifted. (A copy would cost a fresh
    1 MB-per-layer allocation: page faults.)"""
    B, nh, T, _ = out.shape
    saved = torch.empty(B, T, nh, dtype=out.dtype)
    limit = torch.finfo(out.dtype).max / 4
    ok = _kernels[2](_tm(out), _tm(dout), *_factors(dlse, out), limit, saved.numpy())
    return saved.transpose(1, 2) if ok else None


def restore_first_column_(out: torch.Tensor, saved: torch.Tensor) -> None:
    B, nh, T, _ = out.shape
    _kernels[3](_tm(out), _tm(saved), B * T * nh)


def _compile(cache: bool):
    """The loops, compiled for fp32 and fp64 C-contiguous arrays (4x faster than
    strided ones: the hd-long inner loops vectorise)."""
    import numba
    from numba import float32, float64, int64

    def sigs(build):
        return [build(f) for f in (float32, float64)]

    i2 = int64[:, ::1]
    a3, a4 = (lambda f: f[:, :, ::1]), (lambda f: f[:, :, :, ::1])
    # reassociation lets the hd-long dot products and updates vectorise; nothing here is
    # sensitive to the order of a 32-128 term sum beyond ordinary rounding
    fast = {"reassoc", "contract"}
    jit = dict(cache=cache, nogil=True)

    @numba.njit(sigs(lambda f: (a4(f), a4(f), i2, a3(f), f, a3(f))), fastmath=fast, **jit)
    def logits(q, k, first, lse, scale, x):  # q (B, T, H, D), k (B, T, K, D), first (B, T), lse, x (B, T, H)
        B, T, H, D = q.shape
        G = H // k.shape[2]
        zero = q.dtype.type(0)  # a typed accumulator: the dot product vectorises
        for b in range(B):
            for t in range(T):
                f = first[b, t]
                for h in range(H):
                    qr, kr = q[b, t, h], k[b, f, h // G]
                    acc = zero
                    for d in range(D):
                        acc += qr[d] * kr[d]
                    x[b, t, h] = acc * scale - lse[b, t, h]

    # a (B, T, H) gradient arrives as head (H,) x token (B, T) x elem (B, T, H)
    @numba.njit(sigs(lambda f: (a4(f), a4(f), i2, f[::1], f[:, ::1], a3(f), a4(f), a4(f))), fastmath=fast, **jit)
    def grads(q, k, first, wh, wt, we, dq, dk):  # dq like q, dk like k
        B, T, H, D = q.shape
        G = H // k.shape[2]
        for b in range(B):
            for t in range(T):
                f = first[b, t]
                for h in range(H):
                    c = wh[h] * wt[b, t] * we[b, t, h]
                    if c == 0:  # padding, document starts, heads without a gradient
                        continue
                    kh = h // G
                    qr, kr, dqr, dkr = q[b, t, h], k[b, f, kh], dq[b, t, h], dk[b, f, kh]
                    for d in range(D):
                        dqr[d] += c * kr[d]
                        dkr[d] += c * qr[d]

    @numba.njit(sigs(lambda f: (a4(f), a3(f), int64)), **jit)
    def restore(o, saved, rows):  # o[..., 0] = saved in the first `rows` (b, t, h) rows; numpy: 3x slower
        B, T, H, _ = o.shape
        i = 0
        for b in range(B):
            for t in range(T):
                for h in range(H):
                    if i == rows:
                        return
                    o[b, t, h, 0] = saved[b, t, h]
                    i += 1

    @numba.njit(sigs(lambda f: (a4(f), a4(f), f[::1], f[:, ::1], a3(f), f, a3(f))), error_model="numpy", **jit)
    def shift(o, do, gh, gt, ge, limit, saved):  # o, do (B, T, H, D), dlse = gh x gt x ge, saved (B, T, H)
        B, T, H, _ = o.shape
        done = 0
        for b in range(B):
            for t in range(T):
                for h in range(H):
                    saved[b, t, h] = o[b, t, h, 0]
                    dl = gh[h] * gt[b, t] * ge[b, t, h]
                    if dl != 0:
                        delta = dl / do[b, t, h, 0]  # +-inf at dO0 = 0 (error_model numpy: no exception)
                        if not abs(delta) <= limit:  # also NaN: put the rows shifted so far back
                            restore(o, saved, done)
                            return False
                        o[b, t, h, 0] -= delta
                    done += 1
        return True

    return logits, grads, shift, restore
