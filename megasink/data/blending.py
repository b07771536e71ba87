"""Blending several packed datasets by weight (the role of Megatron's BlendedDataset).

The blended dataset has ``sum(len(d))`` samples. Its sample i comes from dataset
``dataset_index[i]``, as that dataset's ``sample_index[i]``-th draw; the interleaving is
greedy: the next sample comes from the dataset furthest behind its share, i.e. the one
with the smallest ``(draws_so_far + 0.5) / weight`` (ties: lower dataset index). After n
samples every dataset has within about one sample of ``n * weight``, exactly and
deterministically, and the index is built in one vectorised sort.

Draw j of dataset k maps to a sample through a seeded permutation of that dataset, a
fresh one each time the dataset wraps around: a dataset drawn more often than it has
samples is repeated (upsampled) in a new order, one drawn less often contributes a
random subset.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from megasink.data.loader import IndexPermutation


def blending_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 (size,), sample_index int64 (size,)) of the greedy interleaving."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"blending weights must be positive and finite, got {list(weights)}")
    w = w / w.sum()
    k = len(w)
    # each dataset gets at most ceil(size*w) + k/2 + 1 draws among the first `size` due times
    counts = np.ceil(size * w).astype(np.int64) + k + 2
    draws = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])  # (sum counts,)
    which = np.repeat(np.arange(k, dtype=np.int16), counts)  # (sum counts,)
    due = (draws + 0.5) / w[which]  # (sum counts,) due time of each draw
    order = np.argsort(due, kind="stable")[:size]  # stable: ties keep the lower dataset index
    return which[order], draws[order]


class BlendedDataset:
    """Samples of ``datasets`` interleaved by ``weights`` (normalised to sum to one)."""

    def __init__(self, datasets: list, weights: list, seed: int, size: Optional[int] = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        for d in datasets:
            if len(d) == 0:
                raise ValueError(f"dataset {getattr(d, 'name', d)!r} has no sample at this seq_len")
        self.datasets = list(datasets)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.size = int(size if size is not None else sum(len(d) for d in datasets))
        self.dataset_index, self.sample_index = blending_index(self.weights, self.size)
        self.lengths = np.array([len(d) for d in datasets], dtype=np.int64)
        self._perms: dict = {}
        self.name = "blend(" + ", ".join(f"{wk:.3g} {getattr(d, 'name', d)}" for wk, d in zip(self.weights, datasets)) + ")"
        bpts = [getattr(d, "bytes_per_token", None) for d in datasets]
        self.bytes_per_token = None if None in bpts else float(np.dot(self.weights, bpts))

    def __len__(self) -> int:
        return self.size

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset k, sample index within dataset k) of blended sample i."""
        k = int(self.dataset_index[i])
        draw = int(self.sample_index[i])
        n = int(self.lengths[k])
        key = (k, draw // n)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[key] = IndexPermutation(n, self.seed * 1_000_003 + k, draw // n)
        return k, perm.one(draw % n)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} blended samples")
        k, j = self.locate(i)
        return self.datasets[k][j]

    def __repr__(self) -> str:
        return f"BlendedDataset({self.name}, samples={self.size})"
