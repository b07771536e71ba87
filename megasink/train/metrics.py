"""Metrics: metrics.jsonl, TensorBoard scalars and images, importance heatmaps (megasink/heatmap.py), MFU.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (docs/design.md,
"File formats and contracts"): step, loss, aux_loss, lr, grad_norm, tokens_per_s, mfu, cv [layers], and at its
own interval importance [layers][heads]; validation steps add val_loss and val_bpb.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megasink.config import ModelConfig
from megasink.utils import atomic_write_bytes

# Dense bf16 peak FLOP/s by device name fragment; CPU is an assumption (stated in the log).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}
CPU_ASSUMED_PEAK = 0.5e12


def peak_flops(configured_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per process, where the number comes from)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, val in PEAK_FLOPS.items():
            if key in name:
                return val, f"{name} bf16 dense peak"
        return 312e12, f"{name}: unknown, assumed A100-class 312 TFLOP/s"
    return CPU_ASSUMED_PEAK, "CPU: assumed 0.5 TFLOP/s per process (set train.peak_tflops)"


def flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: 6 N (all matmul weights, incl. the output layer, excl. the
    input embedding) + 12 L d T for attention scores and values (PaLM's formula)."""
    hd, d = m.head_dim, m.d_model
    q_cols = m.n_heads * (hd + (1 if m.attention == "gated" else 0))
    attn = d * q_cols + 2 * d * m.kv_heads * hd + m.n_heads * hd * d
    mlp = 3 * d * m.ffn_dim
    n = m.n_layers * (attn + mlp) + d * m.vocab_size
    return 6 * n + 12 * m.n_layers * d * m.seq_len


class MetricsLogger:
    """Rank 0's ``metrics.jsonl`` and TensorBoard events (other ranks: a no-op).

    ``start(step)`` opens them for a run that continues after ``step`` (0: a fresh start).
    Records of later steps, left by an earlier run that got further before it was killed,
    and a partial last line are dropped, and TensorBoard purges its events from ``step + 1``
    on, so every step appears once even when a resume re-does steps."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        self.tb = None
        self._file = None
        self._warned_no_matplotlib = False

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        drop_records_after(path, step)
        self._file = open(path, "a", buffering=1)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self._file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, val in record.items():
                if isinstance(val, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"valid/{key}", val, step)
            for i, c in enumerate(record.get("cv", [])):
                self.tb.add_scalar(f"cv/layer_{i}", c, step)

    def log_importance(self, step: int, imp: torch.Tensor, cv: torch.Tensor) -> Optional[Path]:
        """RUN/importance.png (and a TensorBoard image); None without matplotlib, which is optional
        at run time (the numbers are in metrics.jsonl either way)."""
        if not self.enabled:
            return None
        from megasink.heatmap import Panel, save_importance_panels

        imp, cv = (torch.as_tensor(x).detach().to("cpu", torch.float64).tolist() for x in (imp, cv))
        path = self.run_dir / "importance.png"
        try:
            save_importance_panels([Panel(f"step {step}", imp, cv)], path, "head importance (mean gate)")
        except ImportError:
            if not self._warned_no_matplotlib:
                print("note: matplotlib is not installed: no importance.png heatmaps", flush=True)
                self._warned_no_matplotlib = True
            return None
        if self.tb is not None:
            import matplotlib.image as mpimg

            img = torch.from_numpy(mpimg.imread(path)[..., :3].copy())  # (H, W, 3)
            self.tb.add_image("importance/heatmap", img, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the complete records of steps <= ``step`` in the metrics.jsonl at ``path``
    (rewritten atomically, and only when something goes)."""
    if not path.exists():
        return
    *lines, partial = path.read_bytes().split(b"\n")  # partial: what follows the last newline
    kept = [line for line in lines if (s := _record_step(line)) is not None and s <= step]
    if partial or len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


def _record_step(line: bytes) -> Optional[int]:
    """The ``step`` of one metrics.jsonl line, or None when the line is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None
