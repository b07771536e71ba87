"""megasink.quickstart: stale run directories are set aside, and the summary explains the difference."""
from __future__ import annotations

from megasink.config import load_config, save_config
from megasink.quickstart import CONFIG, difference, run_overrides, set_aside_stale


def test_run_from_other_settings_is_moved_aside_not_resumed(tmp_path):
    run_dir = tmp_path / "quickstart-sink"
    overrides = run_overrides(run_dir, tmp_path / "spm.model", tmp_path / "pydoc", 400, 1e-2)
    run_dir.mkdir()
    save_config(load_config(CONFIG, overrides), run_dir / "config.yaml")
    set_aside_stale(run_dir, overrides)  # same settings: kept, so `make quickstart` resumes it
    assert (run_dir / "config.yaml").exists()

    old = load_config(CONFIG, overrides + ["model.n_heads=4", "model.n_kv_heads=2"])  # an older quickstart
    save_config(old, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    set_aside_stale(run_dir, overrides)
    assert not run_dir.exists()
    assert (tmp_path / "quickstart-sink.stale-1" / "checkpoints").is_dir()


def test_difference_names_the_collapse_only_when_it_is_there():
    aux = {"cv": [0.02, 0.05, 0.1, 0.1], "dormant": 0, "val_loss": 4.0}
    collapsed = {"cv": [0.03, 0.1, 0.5, 0.9], "dormant": 4, "val_loss": 4.0}
    text = " ".join(difference(aux, collapsed))
    assert "0.900 without the aux loss (layer 3) vs 0.100 with it (9.0x)" in text
    assert "4 vs 0" in text and "head collapse" in text
    assert "do not differ clearly" in " ".join(difference(aux, dict(aux)))
