"""metrics.jsonl and TensorBoard after a resume: every step once, a killed run's extra steps gone."""
import json

from megasink.train.metrics import MetricsLogger


def _log_steps(run_dir, start, steps, value):
    m = MetricsLogger(run_dir, enabled=True)
    m.start(start)
    for step in steps:
        m.log(step, {"loss": value + step})
    m.close()


def _tensorboard_losses(run_dir) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def test_resume_drops_later_steps_and_a_partial_line(tmp_path):
    _log_steps(tmp_path, 0, range(1, 6), 10.0)  # the first run logs steps 1-5, then is killed ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # ... in the middle of a line
    _log_steps(tmp_path, 3, range(4, 7), 20.0)  # resumed from the step-3 checkpoint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert [(r["step"], r["loss"]) for r in records] == expected
    assert [(s, round(v, 4)) for s, v in _tensorboard_losses(tmp_path)] == expected


def test_resume_leaves_a_clean_file_untouched(tmp_path):
    _log_steps(tmp_path, 0, range(1, 3), 0.0)
    before = (tmp_path / "metrics.jsonl").stat()
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    m.start(2)
    m.close()
    after = (tmp_path / "metrics.jsonl").stat()
    assert (before.st_ino, before.st_size) == (after.st_ino, after.st_size)


def test_importance_heatmap_from_autograd_tensors_and_without_matplotlib(tmp_path, monkeypatch, capsys):
    """log_importance takes the trainer's tensors as they come (here requiring grad: .numpy() of
    them raises, as of device tensors) and, without matplotlib, skips the PNG with one note."""
    import sys

    import torch

    imp = torch.rand(2, 4, requires_grad=True) * 1.0  # (L, H), part of a graph
    cv = imp.std(dim=1) / imp.mean(dim=1)
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    m.start(0)
    path = m.log_importance(1, imp, cv)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert m.log_importance(2, imp, cv) is None and m.log_importance(3, imp, cv) is None
    m.log(3, {"loss": 1.0})
    m.close()
    assert not path.exists() and capsys.readouterr().out.count("matplotlib is not installed") == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
