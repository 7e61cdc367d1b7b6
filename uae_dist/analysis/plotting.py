"""Shared matplotlib helpers: the Agg backend, category colours, labelled scatter plots and a
periodic-table heat map. Every figure is written at a fixed DPI so reruns give the same PNG size."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from uae_dist.analysis.periodic import (BLOCK_ORDER, GROUP_ORDER, PERIOD_ORDER,  # noqa: E402
                                        sites)

DPI = 130
MISSING_COLOUR = "#d9d9d9"
FONT = 7.5          # element labels on maps
LABEL_ITERATIONS = 100  # adjustText steps per map: a fixed count, so reruns draw the same


def save(fig, path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def _group_colours() -> dict:
    # groups are ordinal: a rainbow over 1..18 keeps neighbouring groups in neighbouring hues;
    # the f-series get two colours far from it
    cmap = plt.get_cmap("turbo")
    out = {g: cmap(0.04 + 0.92 * i / 17) for i, g in enumerate(range(1, 19))}
    out.update({"Ln": "#e377c2", "An": "#7f4f24"})
    return out


# attribute of Site → (order of the legend, colours)
COLOURINGS = {
    "group": (GROUP_ORDER, _group_colours()),
    "period": (PERIOD_ORDER, dict(zip(PERIOD_ORDER, plt.get_cmap("Dark2").colors))),
    "block": (BLOCK_ORDER, {"s": "#1f77b4", "p": "#ff7f0e", "d": "#2ca02c", "f": "#d62728"}),
}


def category_colours(n: int) -> list:
    """``n`` well-separated colours for cluster labels."""
    base = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    return [base[i % len(base)] for i in range(n)]


def place_labels(ax, xy: np.ndarray, symbols, fontsize: float = FONT) -> np.ndarray:
    """Label positions (n, 2) in data coordinates for the points ``xy`` on ``ax`` (limits set):
    adjustText pushes labels apart where points crowd. The placement is returned so panels of the
    same map and size can reuse it instead of repeating the search."""
    from adjustText import adjust_text

    texts = [ax.text(x, y, s, fontsize=fontsize) for (x, y), s in zip(xy, symbols)]
    adjust_text(texts, x=xy[:, 0], y=xy[:, 1], ax=ax, expand=(1.2, 1.4), force_text=(0.6, 0.9),
                force_explode=(0.6, 1.2), max_move=(30, 30), iter_lim=LABEL_ITERATIONS)
    pos = np.array([t.get_position() for t in texts], dtype=float)
    for t in texts:
        t.remove()
    return pos


def set_limits(ax, xy: np.ndarray) -> None:
    pad = 0.07 * (xy.max(0) - xy.min(0) + 1e-9)
    ax.set_xlim(xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0])
    ax.set_ylim(xy[:, 1].min() - pad[1], xy[:, 1].max() + pad[1])


def labelled_scatter(ax, xy: np.ndarray, symbols, colours, title: str,
                     labels: np.ndarray | None = None, fontsize: float = FONT) -> np.ndarray:
    """Points coloured one by one, each labelled with its element symbol at ``labels`` (computed
    by place_labels when not given); a thin leader line joins a label moved off its point.
    Returns the label positions."""
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=26, edgecolors="black", linewidths=0.3, zorder=2)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    set_limits(ax, xy)
    if labels is None:
        labels = place_labels(ax, xy, symbols, fontsize)
    span = np.abs(np.diff(ax.get_xlim())[0]) + np.abs(np.diff(ax.get_ylim())[0])
    for p, t, s in zip(xy, labels, symbols):
        far = np.abs(p - t).sum() > 0.02 * span
        ax.annotate(s, xy=p, xytext=t, fontsize=fontsize, zorder=3, va="baseline", ha="left",
                    arrowprops=dict(arrowstyle="-", color="0.45", lw=0.4, shrinkA=0,
                                    shrinkB=2) if far else None)
    return labels


def legend_for(ax, order, colours, present, title: str, ncol: int = 1) -> None:
    handles = [Patch(facecolor=colours[v], edgecolor="black", linewidth=0.3, label=str(v))
               for v in order if v in present]
    ax.legend(handles=handles, title=title, fontsize=7, title_fontsize=8, ncol=ncol,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def periodic_heatmap(ax, colour_of: dict, text_of: dict, title: str,
                     excluded: dict[str, str]) -> None:
    """Draw the 100 elements as cells: ``colour_of[z]`` fills analysed cells, ``text_of[z]`` is an
    optional second line; ``excluded`` maps a symbol to why it is left out (drawn grey, hatched)."""
    for s in sites():
        x, y = s.col, -s.row
        if s.z in colour_of:
            face, hatch = colour_of[s.z], None
        else:
            face, hatch = MISSING_COLOUR, "///"
        ax.add_patch(Rectangle((x, y), 0.94, 0.94, facecolor=face, edgecolor="0.3", lw=0.5,
                               hatch=hatch))
        ax.text(x + 0.47, y + 0.6, s.symbol, ha="center", va="center", fontsize=8,
                weight="bold")
        sub = text_of.get(s.z) if s.z in colour_of else excluded.get(s.symbol, "")
        if sub:
            ax.text(x + 0.47, y + 0.24, sub, ha="center", va="center", fontsize=5.5)
    for label, row in (("La–Lu", 5), ("Ac–", 6)):  # the f-series' place in the main table
        ax.text(2.47, -row + 0.47, label, ha="center", va="center", fontsize=6, color="0.35")
    ax.set_xlim(-0.2, 18.1)
    ax.set_ylim(-9.2, 1.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=12)
