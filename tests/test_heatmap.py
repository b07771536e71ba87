"""megasink/heatmap.py: one drawing function for every importance heatmap (trainer, diagnosis,
quickstart, report); numbers readable on every cell (text colour by the cell's luminance)."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from megasink import heatmap  # noqa: E402


def _contrast(a, b) -> float:
    """WCAG contrast ratio of two sRGB colours."""
    def lum(rgba):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_numbers_are_readable_on_dark_cells():
    """The compare heatmap once printed black numbers on dark red and dark blue cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    imp = [[0.01, 0.5, 0.5, 0.99], [0.2, 0.3, 0.5, 0.6]]  # relative 0.02 ... 1.98: every shade of the scale
    fig, ax = plt.subplots()
    im = heatmap.draw_importance(ax, imp, "t")
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t for t in ax.texts}
    assert len(texts) == 8
    rel = heatmap.relative_importance(imp)
    for (head, layer), text in texts.items():
        cell = im.cmap(im.norm(rel[layer][head]))
        chosen = _contrast(to_rgba(text.get_color()), cell)
        other = _contrast(to_rgba("white" if text.get_color() == "black" else "black"), cell)
        assert chosen >= other, (layer, head, text.get_color(), cell)
        assert chosen >= 4.5  # WCAG AA for normal text
    assert texts[(0, 0)].get_color() == "white" and texts[(3, 0)].get_color() == "white"  # dark red, dark blue
    assert texts[(1, 0)].get_color() == "black"  # near white
    plt.close(fig)


def test_one_drawing_function_for_every_heatmap(tmp_path, monkeypatch):
    """Trainer, diagnosis and quickstart all draw through heatmap.draw_importance, with CV and
    shared heads where they have them."""
    import torch

    from megasink.eval.diagnose import Diagnosis, plot_heatmap
    from megasink.quickstart import summarize
    from megasink.train.metrics import MetricsLogger

    calls = []
    draw = heatmap.draw_importance

    def spy(ax, imp, title="", cv=None, shared=None, annotate=None):
        calls.append((title, cv, shared))
        return draw(ax, imp, title, cv, shared, annotate)

    monkeypatch.setattr(heatmap, "draw_importance", spy)
    imp = torch.tensor([[0.6, 0.2, 0.5, 0.7], [0.4, 0.4, 0.5, 0.05]], dtype=torch.float64)
    cv = (imp.std(-1, unbiased=False) / imp.mean(-1)).tolist()

    logger = MetricsLogger(tmp_path / "run", enabled=True, tensorboard=False)
    logger.start(0)
    assert logger.log_importance(5, imp, torch.tensor(cv)).read_bytes()[:4] == b"\x89PNG"
    logger.close()
    plot_heatmap(Diagnosis("runs/x", "sink", imp, 3, 30, 16, top_m=2), tmp_path / "importance.png")
    run = _fake_run(tmp_path / "qs", imp.tolist(), cv)
    summarize({"a": run, "b": run}, 60.0)
    assert [c[0] for c in calls] == ["step 5: 2 dormant", "x (sink): 2 dormant", "a: 2 dormant", "b: 2 dormant"]
    assert all(c[1] is not None for c in calls)  # every one labels the per-layer CV
    assert calls[1][2] == [[3, 0], [2, 0]]  # diagnosis boxes its top-2 shared heads
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically


def _fake_run(run_dir, imp, cv):
    import json

    run_dir.mkdir(parents=True)
    recs = [{"step": 1, "loss": 6.0, "cv": cv}, {"step": 4, "loss": 4.0, "cv": cv, "importance": imp},
            {"step": 4, "val_loss": 4.2, "val_bpb": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir
