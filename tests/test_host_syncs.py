"""Host synchronisations per training step, counted: every tensor-to-host read (``.item()``,
``bool()``, ``float()``, ``.tolist()``, ``nonzero``) that megasink's own code makes in one step
between log steps. On a GPU each one stalls the launch queue; the trainer makes one (loss, aux
loss and, without ZeRO, the gradient norm come to the host together). Before issue 21 it made
3 per micro-batch + 2 (a finite check and a loss mean per micro-batch)."""
import collections
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from train_utils import TINY

SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero"}
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megasink")


class CountSyncs(TorchFunctionMode):
    """Counts host-synchronising calls made directly from megasink's code, by call site."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCS:
            caller = traceback.extract_stack(limit=2)[0]  # the frame that called the tensor method
            if caller.filename.startswith(PACKAGE):
                self.sites[f"{os.path.relpath(caller.filename, PACKAGE)}:{caller.lineno} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("zero,accumulation", [(0, "global"), (1, "global"), (0, "micro")])
def test_one_host_sync_per_step(tmp_path, monkeypatch, zero, accumulation):
    from megasink.config import load_config
    from megasink.train import trainer
    from megasink.train.main import run

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    steps = []
    original = trainer.Trainer.train_step

    def counted(self, batches, **kw):
        with CountSyncs() as count:
            result = original(self, batches, **kw)
        steps.append(count.sites)
        return result

    monkeypatch.setattr(trainer.Trainer, "train_step", counted)
    cfg = load_config("configs/tiny-sink.yaml", TINY + [
        f"run_dir={tmp_path / 'run'}", "train.steps=2", "train.log_interval=2", "train.save_checkpoints=false",
        f"parallel.zero_stage={zero}", f"aux_loss.accumulation={accumulation}"])
    try:
        run(cfg)
    finally:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
    assert len(steps) == 2 and cfg.train.global_batch_size // cfg.train.micro_batch_size == 2  # A = 2
    assert sum(steps[0].values()) == 1, dict(steps[0])  # step 1 logs nothing
