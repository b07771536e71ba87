"""Helpers to run the real trainer in spawned ranks and read its metrics."""
from __future__ import annotations

import json
from pathlib import Path

TINY = ["model.n_layers=2", "model.seq_len=64", "model.d_model=64", "model.vocab_size=128",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=1",
        "train.progress=false", "train.warmup_steps=2", "aux_loss.coef=100", "train.resume=auto",
        # a wider init spreads head importance (CV ~ 1e-2): the CV^2 is then well conditioned in fp32
        "model.init_std=0.1"]


def train_worker(rank, world_size, config, overrides):
    from megasink.config import load_config
    from megasink.train.main import run

    cfg = load_config(config, overrides)
    result = run(cfg)
    return result


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir, key="loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}
