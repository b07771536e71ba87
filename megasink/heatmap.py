"""Head-importance heatmaps, and what a dormant head is.

One drawing function, ``draw_importance``, paints every picture of head importance: the
trainer's RUN/importance.png, diagnose_heads.py's importance.png, the quickstart's comparison
and the reproduction report's grids (``save_importance_panels`` lays panels out in one row).

Importance (a head's mean gate) can sit anywhere in (0, 1) and differ by a few percent between
heads, so a 0-to-max colour scale paints a healthy layer and a collapsed one the same colour.
Here the colour is importance / its layer's mean on a diverging scale centred at 1 (0 to 2):
balanced heads are white, dominant heads blue, dormant heads dark red. Each cell prints the
importance itself, in black or white, whichever reads on the cell's colour (by its luminance).
Optional: the per-layer CV as labels on the right, shared heads boxed.

A head is *dormant* when its importance is below ``DORMANT`` x its layer's mean: the one
definition, used by the quickstart summary, diagnose_heads.py, ablate_heads.py and the
reproduction report (benchmarks/).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

DORMANT = 0.5
"""A head is dormant when its importance is below DORMANT x its layer's mean."""

COLORBAR_LABEL = "importance / layer mean"
LEGEND = f"colour: importance / layer mean; cells: importance; dormant: < {DORMANT} x layer mean"
SHARED_EDGE = "orange"  # the box around a shared head: distinct from red, white and blue cells
ANNOTATE_MAX_CELLS = 1024  # beyond this many heads in a panel the numbers would not be legible


def relative_importance(imp) -> list[list[float]]:
    """(L, H) importance divided by each layer's mean (NaN for a layer whose mean is not positive)."""
    rows = [[float(x) for x in row] for row in imp]
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        out.append([x / mean if mean > 0 else math.nan for x in row])
    return out


def dormant_mask(imp) -> list[list[bool]]:
    """(L, H) True where a head is dormant: importance < DORMANT x its layer's mean."""
    return [[r < DORMANT for r in row] for row in relative_importance(imp)]


def dormant_count(imp) -> int:
    """How many heads of an (L, H) importance are dormant."""
    return sum(sum(row) for row in dormant_mask(imp))


def text_colour(rgba: Sequence[float]) -> str:
    """"black" or "white", whichever reads on a cell of colour ``rgba`` (sRGB in 0..1): white
    where the cell's relative luminance (ITU-R BT.709 weights of the linearised channels) is
    below 0.18, about where black and white text have equal contrast."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.18 else "black"


class Panel(NamedTuple):
    """One heatmap: its title, (L, H) importance, and optionally (L,) CV and [L][m] shared heads."""

    title: str
    importance: list
    cv: Optional[list] = None
    shared: Optional[list] = None


def draw_importance(ax, imp, title: str = "", cv=None, shared=None, annotate: Optional[bool] = None):
    """Draw one (L, H) importance on ``ax``; returns the image (for a colour bar). ``cv``: per-layer
    values labelled on the right; ``shared``: [L][m] heads to box; ``annotate`` None: the numbers
    when the panel has at most ANNOTATE_MAX_CELLS heads."""
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    imp = [[float(x) for x in row] for row in imp]
    L, H = len(imp), len(imp[0])
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="lightgrey")
    norm = Normalize(vmin=0.0, vmax=2.0)
    rel = relative_importance(imp)
    im = ax.imshow(rel, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if annotate if annotate is not None else L * H <= ANNOTATE_MAX_CELLS:
        size = 5 if H > 8 else 6
        for layer, (row, rel_row) in enumerate(zip(imp, rel)):
            for head, (x, r) in enumerate(zip(row, rel_row)):
                colour = text_colour(cmap(norm(r))) if math.isfinite(r) else "black"
                ax.text(head, layer, f"{x:.2f}", ha="center", va="center", fontsize=size, color=colour)
    for layer, heads in enumerate(shared or []):
        for head in heads:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=SHARED_EDGE,
                                   linewidth=1.5))
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.tick_params(labelsize=6)
    ax.set_xlabel("head", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_title(title, fontsize=8)
    if cv is not None:
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(L), [f"{float(c):.2f}" for c in cv])
        right.tick_params(labelsize=6)
        right.set_ylabel("CV of the layer", fontsize=7)
    return im


def save_importance_panels(panels: Sequence, path: str | os.PathLike, title: str = "") -> Path:
    """One PNG (written atomically) with a heatmap per panel (a ``Panel`` or a (title, importance)
    pair) side by side, each titled with its dormant heads, and one colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megasink.utils import atomic_write_bytes

    panels = [Panel(*p) for p in panels]
    heads = max(len(p.importance[0]) for p in panels)
    layers = max(len(p.importance) for p in panels)
    width = min(0.45 * heads * len(panels) + 2.5 + (0.6 if any(p.cv for p in panels) else 0.0), 60.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, min(0.4 * layers + 2.0, 40.0)),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, p in zip(axes[0], panels):
        im = draw_importance(ax, p.importance, f"{p.title}: {dormant_count(p.importance)} dormant", p.cv, p.shared)
    fig.colorbar(im, ax=axes, shrink=0.9).set_label(COLORBAR_LABEL, fontsize=8)
    fig.suptitle(f"{title}\n({LEGEND})" if title else LEGEND, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
