"""Checkpoint directory handling: resolution, latest pointer, pruning, weights-only saves."""
import pytest
import torch

import megasink
from megasink.train import checkpoint as ck


def _cfg():
    return megasink.load_config("configs/tiny-gated.yaml", ["model.n_layers=2", "model.tie_embeddings=true"])


def test_save_load_roundtrip_and_resolution(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = megasink.build_model(cfg.model, cfg.aux_loss)
    model.shared_heads[1, 2] = True
    root = tmp_path / "run" / "checkpoints"
    ck.save_model_checkpoint(model, cfg, root / "step_3")
    ck.update_latest(root, "step_3")
    for path in (tmp_path / "run", root, root / "step_3"):  # run dir, checkpoints dir, step dir
        loaded, _ = megasink.load_checkpoint(path)
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), n
    assert loaded.output.weight is loaded.tok_embeddings.weight  # tied stays tied
    assert not list(root.glob("*.tmp"))


def test_latest_pointing_at_incomplete_dir_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_5.tmp").mkdir(parents=True)
    ck.update_latest(root, "step_5")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.resolve_checkpoint_dir(root)
    with pytest.raises(FileNotFoundError, match="no megasink checkpoint"):
        ck.resolve_checkpoint_dir(tmp_path / "nothing")


def test_prune_keeps_newest_and_latest(tmp_path):
    cfg = _cfg()
    model = megasink.build_model(cfg.model)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        ck.save_model_checkpoint(model, cfg, root / f"step_{step}")
    ck.update_latest(root, "step_4")  # e.g. resumed from an older one
    ck.prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_4", "step_8"]
