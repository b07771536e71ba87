"""megasink.quickstart: stale run directories are set aside, finished runs are reused (and the
summary says so), and the summary explains the difference."""
from __future__ import annotations

from megasink.config import load_config, save_config
from megasink.quickstart import CONFIG, difference, finished, run_overrides, set_aside_stale, summarize


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


def test_finished_runs_are_reused_and_the_summary_says_so(tmp_path):
    """A rerun of `make quickstart` once reprinted "wall time 0.3 min" as if it had trained."""
    import json

    from conftest import build_seeded, small_model_cfg
    from megasink.checkpoint import save_model_checkpoint, update_latest
    from megasink.config import Config

    cfg = Config(model=small_model_cfg("sink"))
    imp = [[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.5, 0.5]]
    runs = {}
    for name, last in (("aux", 4), ("noaux", 2)):  # noaux stopped at step 2 of 4 (killed)
        run = tmp_path / name
        save_model_checkpoint(build_seeded(cfg.model), cfg, run / "checkpoints" / f"step_{last}")
        update_latest(run / "checkpoints", f"step_{last}")
        recs = [{"step": 1, "loss": 6.0, "cv": [0.0, 0.5]},
                {"step": last, "loss": 4.0, "cv": [0.0, 0.5], "importance": imp}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        runs[name] = run
    assert finished(runs["aux"], 4) and not finished(runs["noaux"], 4) and not finished(tmp_path / "none", 4)

    both = summarize(runs, 18.0, reused=["aux", "noaux"])
    assert "wall time" not in both and "reused the finished runs" in both and "nothing was trained now" in both
    one = summarize(runs, 90.0, reused=["aux"])
    assert f"wall time: 1.5 min; reused the finished run aux (delete {runs['aux']} to train it again)" in one
    assert "wall time: 1.5 min\n" in summarize(runs, 90.0)
    assert "source .venv/bin/activate" in both  # the closing commands need the environment
