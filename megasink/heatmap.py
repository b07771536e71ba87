"""Head-importance heatmaps whose colours show the differences between heads.

Importance (a head's mean gate) can sit anywhere in (0, 1) and differ by a few percent
between heads, so a 0-to-max colour scale paints a healthy layer and a collapsed one the
same colour. Here the colour is importance / its layer's mean on a diverging scale centred
at 1 (0 to 2): balanced heads are white, dominant heads blue, dormant heads (below 0.5 x
the layer mean) dark red; each cell also prints the importance itself.
"""
from __future__ import annotations

import os
from pathlib import Path

DORMANT = 0.5
"""A head is dormant when its importance is below DORMANT x its layer's mean."""


def relative_importance(imp) -> list[list[float]]:
    """(L, H) importance divided by each layer's mean."""
    return [[float(x) / (sum(map(float, row)) / len(row)) for x in row] for row in imp]


def dormant_count(imp) -> int:
    return sum(r < DORMANT for row in relative_importance(imp) for r in row)


def draw_importance(ax, imp, title: str = "", annotate: bool = True):
    """Draw one (L, H) importance matrix on ``ax``; returns the image for a colour bar."""
    imp = [[float(x) for x in row] for row in imp]
    im = ax.imshow(relative_importance(imp), cmap="RdBu", vmin=0.0, vmax=2.0, aspect="auto")
    if annotate:
        for layer, row in enumerate(imp):
            for head, x in enumerate(row):
                ax.text(head, layer, f"{x:.2f}", ha="center", va="center", fontsize=5 if len(row) > 8 else 6)
    ax.set_xticks(range(len(imp[0])))
    ax.set_yticks(range(len(imp)))
    ax.tick_params(labelsize=6)
    ax.set_xlabel("head", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_title(title, fontsize=8)
    return im


COLORBAR_LABEL = "importance / layer mean"
LEGEND = "colour: importance / layer mean; cells: importance; dormant: < 0.5 x layer mean"


def save_importance_panels(panels: list[tuple[str, list]], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG with a heatmap per (title, importance) panel side by side and one colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(len(imp[0]) for _, imp in panels)
    layers = max(len(imp) for _, imp in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.45 * heads * len(panels) + 2.5, 0.4 * layers + 2.0),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, (name, imp) in zip(axes[0], panels):
        im = draw_importance(ax, imp, f"{name}: {dormant_count(imp)} dormant")
    fig.colorbar(im, ax=axes, shrink=0.9).set_label(COLORBAR_LABEL, fontsize=8)
    fig.suptitle(f"{title}\n({LEGEND})" if title else LEGEND, fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
