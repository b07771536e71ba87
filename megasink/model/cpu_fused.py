"""Fused CPU loops for the vanilla gate's per-token work (numba; optional).

The vanilla gate needs, per token t and query head h, s0 = q[t, h] . k[first(t), kv(h)] (the
score on its document's first key), and in the backward dq[t, h] += w k[first(t), kv(h)] and
dk[first(t), kv(h)] += w q[t, h]. As PyTorch ops that is a gathered copy of k plus ~6 passes
over (B, T, nh, hd), each as slow as ~1/20 of the layer's matmuls at d_model 128: ~5 % of a
tiny model's training step. Here each is one loop over q in the token-major memory that the
projections and the CPU flash kernel already use.

Used for fp32 / fp64 CPU tensors when numba imports (``enabled``); everywhere else the
callers' PyTorch code runs. Tests check both against each other and against autograd.
Compiled on first use and cached next to this file (about a second).
"""
from __future__ import annotations

import torch

try:
    import numba
except ImportError:  # the PyTorch code paths run instead
    numba = None

enabled = numba is not None


def usable(*tensors: torch.Tensor) -> bool:
    return enabled and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def _token_major(x: torch.Tensor):
    """(B, n, T, d) or (B, n, T) -> numpy view in (B, T, n[, d]) order, sharing memory."""
    return x.detach().transpose(1, 2).numpy()


def _first(first_idx, B: int, T: int):
    return (torch.zeros(B, T, dtype=torch.long) if first_idx is None else first_idx).numpy()


def log_first_weight(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, first_idx, scale: float) -> torch.Tensor:
    """q (B, nh, T, hd), k (B, nkv, T, hd), lse (B, nh, T) -> (B, nh, T) in lse's dtype:
    q[t] . k[first(t)] * scale - lse[t]. ``first_idx`` (B, T), None: every token's first key is 0."""
    B, nh, T, _ = q.shape
    x = torch.empty(B, T, nh, dtype=lse.dtype)
    _logits(_token_major(q), _token_major(k), _first(first_idx, B, T), _token_major(lse), scale, x.numpy())
    return x.transpose(1, 2)


def add_first_key_grads_(dq, dk, q, k, w, first_idx) -> None:
    """In place: dq[t, h] += w[t, h] k[first(t), kv(h)], dk[first(t), kv(h)] += w[t, h] q[t, h].
    w (B, nh, T) in q's dtype; dq, dk any strides."""
    B, nh, T, _ = q.shape
    _grads(_token_major(q), _token_major(k), _first(first_idx, B, T), _token_major(w.to(q.dtype)),
           _token_major(dq), _token_major(dk))


def shift_first_column_(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor):
    """kernels._shift_out in place: O[:, 0] -= dLSE / dO[:, 0] in every row with dLSE != 0, and
    the original column (B, nh, T) returned for ``restore_first_column_``; None (and out
    untouched) when a shift is not finite or would exceed a quarter of the dtype's range.

    In place, through numpy, so torch's version counter of ``out`` does not move: the caller
    runs the kernel backward on the shifted tensor and restores it bitwise right after. Safe
    because every op that saved ``out`` consumed it, so its backward has already run when
    this op's runs (a copy would cost a fresh 1 MB-per-layer allocation: page faults)."""
    B, nh, T, _ = out.shape
    saved = torch.empty(B, T, nh, dtype=out.dtype)
    limit = torch.finfo(out.dtype).max / 4
    ok = _shift(_token_major(out), _token_major(dout), _token_major(dlse.to(out.dtype)), limit, saved.numpy())
    return saved.transpose(1, 2) if ok else None


def restore_first_column_(out: torch.Tensor, saved: torch.Tensor) -> None:
    _token_major(out)[..., 0] = _token_major(saved)


if numba is not None:
    # reassociation lets the hd-long dot products and updates vectorise; nothing here is
    # sensitive to the order of a 32-128 term sum beyond ordinary rounding
    _FAST = {"reassoc", "contract"}

    @numba.njit(cache=True, fastmath=_FAST)
    def _logits(q, k, first, lse, scale, x):  # q (B, T, H, D), k (B, T, K, D), first (B, T), lse, x (B, T, H)
        B, T, H, D = q.shape
        G = H // k.shape[2]
        zero = q.dtype.type(0)  # a typed accumulator: the dot product vectorises (2x faster)
        for b in range(B):
            for t in range(T):
                f = first[b, t]
                for h in range(H):
                    qr, kr = q[b, t, h], k[b, f, h // G]
                    acc = zero
                    for d in range(D):
                        acc += qr[d] * kr[d]
                    x[b, t, h] = acc * scale - lse[b, t, h]

    @numba.njit(cache=True, fastmath=_FAST)
    def _grads(q, k, first, w, dq, dk):  # w (B, T, H); dq like q, dk like k
        B, T, H, D = q.shape
        G = H // k.shape[2]
        for b in range(B):
            for t in range(T):
                f = first[b, t]
                for h in range(H):
                    c = w[b, t, h]
                    if c == 0:  # padding, document starts, heads without a gradient
                        continue
                    kh = h // G
                    qr, kr, dqr, dkr = q[b, t, h], k[b, f, kh], dq[b, t, h], dk[b, f, kh]
                    for d in range(D):
                        dqr[d] += c * kr[d]
                        dkr[d] += c * qr[d]

    @numba.njit(cache=True, error_model="numpy")  # x / 0 is inf, as in numpy, not an exception
    def _shift(o, do, dlse, limit, saved):  # o, do (B, T, H, D), dlse, saved (B, T, H)
        B, T, H, _ = o.shape
        done = 0
        for b in range(B):
            for t in range(T):
                for h in range(H):
                    saved[b, t, h] = o[b, t, h, 0]
                    dl = dlse[b, t, h]
                    if dl != 0:
                        delta = dl / do[b, t, h, 0]  # +-inf at dO0 = 0
                        if not abs(delta) <= limit:  # also NaN
                            _undo(o, saved, done)
                            return False
                        o[b, t, h, 0] -= delta
                    done += 1
        return True

    @numba.njit(cache=True)
    def _undo(o, saved, rows):  # the first `rows` rows of o back to their saved first column
        B, T, H = saved.shape
        i = 0
        for b in range(B):
            for t in range(T):
                for h in range(H):
                    if i == rows:
                        return
                    o[b, t, h, 0] = saved[b, t, h]
                    i += 1
