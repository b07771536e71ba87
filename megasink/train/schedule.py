"""Learning-rate schedules as multipliers of the peak LR (for LambdaLR)."""
from __future__ import annotations

import math
from typing import Callable

from megasink.config import TrainConfig


def lr_multiplier(t: TrainConfig) -> Callable[[int], float]:
    """step (completed optimizer steps) -> lr / t.lr. Warmup is linear from lr/warmup."""
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0
    warmup = max(t.warmup_steps, 0)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, t.steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: warmup, stable at peak, then linear decay over the last decay_fraction of steps
        decay_steps = max(1, int(round(t.steps * t.decay_fraction)))
        decay_start = t.steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - floor) * min(1.0, (step - decay_start) / decay_steps)

    return fn
