"""Deterministic, resumable batches for data-parallel training.

Ordering contract (a data-parallel run sees the same global batches as one process):
the loader walks a seeded permutation of the sample indices ``[0, len(dataset))``, a new
permutation per epoch (keyed by seed and epoch); consecutive groups of
``micro_batch_size * dp_size`` permuted indices form one *round*, and rank r takes slice
``[r*mbs, (r+1)*mbs)`` of each round. An epoch has ``len(dataset) // round_size`` rounds
(the incomplete tail is dropped so every rank gets full batches).

The permutation is computed on demand (:class:`IndexPermutation`: a Feistel network with
cycle walking, the random-access shuffle of e.g. TensorFlow's ``index_shuffle``), so it
needs no memory for any dataset size, the synthetic dataset's 2**40 samples included, and
the whole loader state is three integers: epoch, samples consumed in the epoch, seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np

from megasink.errors import DataError

_M64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A seeded pseudo-random bijection of ``[0, n)``, evaluated on arrays of positions.

    A balanced Feistel network over the smallest even number of bits covering n (domain
    at most 4n) is a bijection of that domain; cycle walking (re-applying it until the
    value falls below n) restricts it to a bijection of ``[0, n)``.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int = 0):
        if n <= 0:
            raise ValueError(f"cannot permute {n} elements")
        self.n = int(n)
        half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), 0x5EED]
        self._keys = np.random.SeedSequence(entropy).generate_state(self.ROUNDS, dtype=np.uint64)
        self._int_keys = [int(k) for k in self._keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def _encrypt_int(self, x: int) -> int:
        """``_encrypt`` for one Python int (same result, without numpy's per-call overhead)."""
        half, mask = int(self._half), int(self._mask)
        left, right = x >> half, x & mask
        for key in self._int_keys:
            z = right ^ key
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            left, right = right, left ^ ((z ^ (z >> 31)) & mask)
        return (left << half) | right

    def one(self, position: int) -> int:
        """Permuted index of one position."""
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} not in [0, {self.n})")
        y = self._encrypt_int(int(position))
        while y >= self.n:
            y = self._encrypt_int(y)
        return y

    def __call__(self, positions) -> np.ndarray:
        """Permuted indices (int64) of ``positions`` (array-like of ints in [0, n))."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        y = self._encrypt(pos.astype(np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


@dataclass
class DataLoaderState:
    """Where a loader is: goes into checkpoints (JSON- and torch-serialisable as a dict)."""

    epoch: int = 0
    """Current epoch (each has its own permutation)."""
    consumed: int = 0
    """Samples consumed by all ranks together in this epoch (a multiple of the round size)."""
    seed: int = 0
    """Seed of the permutations."""
    shuffle: bool = True
    """Whether samples are permuted (False: in order, e.g. validation)."""
    num_samples: int = 0
    """len(dataset) when saved: a different value means the data changed."""

    def to_dict(self) -> dict:
        """Plain dict of ints and a bool (JSON / torch.save)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataLoaderState":
        """Inverse of ``to_dict``; unknown keys are errors."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"data loader state has unknown keys {sorted(unknown)}")
        return cls(**{k: (bool(v) if k == "shuffle" else int(v)) for k, v in d.items()})


class DataLoader:
    """Micro-batches for one data-parallel rank; see the module docstring for the order.

    ``next_batch()`` -> ``{"tokens", "targets", "doc_ids"}``, int64 CPU tensors [B, seq_len]:
    tokens = window[:-1], targets = window[1:], doc_ids = window doc ids[:-1].
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size > 0 and 0 <= dp_rank < dp_size, got micro_batch_size={micro_batch_size}, "
                f"dp_rank={dp_rank}, dp_size={dp_size}"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.round_size = micro_batch_size * dp_size
        self.rounds_per_epoch = len(dataset) // self.round_size
        if self.rounds_per_epoch == 0:
            raise DataError(
                f"dataset {getattr(dataset, 'name', dataset)!r} has {len(dataset)} samples, fewer than one round of "
                f"micro_batch_size * dp_size = {self.round_size}: use more data or a smaller batch / seq_len"
            )
        self.state = DataLoaderState(seed=int(seed), shuffle=bool(shuffle), num_samples=len(dataset))
        self._perm: Optional[IndexPermutation] = None
        self._perm_epoch = -1
        self.last_indices = np.zeros(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (after the epoch boundary is crossed)."""
        return self.state.epoch

    def _permutation(self) -> IndexPermutation:
        if self._perm_epoch != self.state.epoch:
            self._perm = IndexPermutation(len(self.dataset), self.state.seed, self.state.epoch)
            self._perm_epoch = self.state.epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """Sample indices of this rank's next micro-batch (advances the state)."""
        s = self.state
        if s.consumed + self.round_size > self.rounds_per_epoch * self.round_size:
            s.epoch += 1
            s.consumed = 0
        # (mbs,) positions of this rank's slice of the current round
        positions = s.consumed + self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size, dtype=np.int64)
        indices = self._permutation()(positions) if s.shuffle else positions
        s.consumed += self.round_size
        self.last_indices = indices
        return indices

    def next_batch(self) -> dict:
        """The next micro-batch of this rank as int64 CPU tensors [B, seq_len]: ``tokens``, ``doc_ids``
        and ``targets`` (the next tokens; -100 where a loss mask excludes the target)."""
        import torch

        samples = [self.dataset[int(i)] for i in self.next_indices()]
        windows = np.stack([s["tokens"] for s in samples])  # (B, seq_len+1)
        doc_ids = np.stack([s["doc_ids"] for s in samples])  # (B, seq_len+1)
        targets = windows[:, 1:].copy()  # (B, seq_len)
        if any("loss_mask" in s for s in samples):  # a sample without one (a blended text corpus): all targets
            mask = np.stack([s.get("loss_mask", np.ones(len(s["tokens"]), np.uint8)) for s in samples])
            targets[mask[:, 1:] == 0] = -100  # ignored by the loss: prompt tokens of fine-tuning data
        return {
            "tokens": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            "targets": torch.from_numpy(targets),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(doc_ids[:, :-1])),
        }

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Small JSON-serialisable state for checkpoints (see DataLoaderState)."""
        return self.state.to_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where the saved loader stopped (same data, seed and ordering)."""
        state = sd if isinstance(sd, DataLoaderState) else DataLoaderState.from_dict(dict(sd))
        if state.num_samples != len(self.dataset):
            raise DataError(
                f"data loader state was saved for a dataset of {state.num_samples} samples, but "
                f"{getattr(self.dataset, 'name', 'this dataset')} has {len(self.dataset)}: the data, seq_len or "
                "data.path changed since the checkpoint"
            )
        if state.seed != self.state.seed or state.shuffle != self.state.shuffle:
            raise DataError(
                f"data loader state has seed={state.seed}, shuffle={state.shuffle} but this loader has "
                f"seed={self.state.seed}, shuffle={self.state.shuffle}: resume with the checkpoint's train.seed"
            )
        if state.consumed % self.round_size:
            raise DataError(
                f"data loader state consumed {state.consumed} samples of epoch {state.epoch}, not a multiple of "
                f"micro_batch_size * dp_size = {self.round_size}: resume with a layout whose round divides it"
            )
        self.state = DataLoaderState(**state.to_dict())


def build_loader(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """The loader of one data-parallel rank (validation: ``shuffle=False``)."""
    return DataLoader(dataset, micro_batch_size, dp_rank, dp_size, seed, shuffle)


def iter_validation_batches(
    dataset, micro_batch_size: int, num_batches: int = 0, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[dict]:
    """The first ``num_batches`` micro-batches of this rank over ``dataset`` in order (0: one full pass).

    Always starts from the beginning, so every evaluation sees the same samples; stops
    early (on every rank alike) when one pass has fewer rounds than asked.
    """
    loader = DataLoader(dataset, micro_batch_size, dp_rank, dp_size, seed=0, shuffle=False)
    n = loader.rounds_per_epoch if num_batches <= 0 else min(num_batches, loader.rounds_per_epoch)
    for _ in range(n):
        yield loader.next_batch()


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (pinned and copied asynchronously to a GPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
