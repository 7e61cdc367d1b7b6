"""Cosine similarity between elements, each element's nearest elements, and how far two tables
agree on which elements are alike (a Mantel-style Spearman correlation of distance matrices).

Similarities are taken in the shared feature space of frame.py (column z-scores over the analysed
elements), so they are correlations between elements' standardised feature profiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uae_dist.analysis import plotting
from uae_dist.analysis.frame import Frame
from uae_dist.analysis.periodic import sites


def cosine(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarity of the rows of ``x`` (a zero row has similarity 0 to all)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return np.clip(u @ u.T, -1.0, 1.0)


def nearest(sim: np.ndarray, symbols, k: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each element, its ``k`` most similar other elements with their similarity (ties broken
    by the lower Z, so the list is reproducible)."""
    out = []
    for i, s in enumerate(symbols):
        row = np.round(sim[i], 10)  # rounding noise must not break ties
        row[i] = -np.inf
        idx = np.lexsort((np.arange(len(row)), -row))[:k]
        out.append((s, [(symbols[j], float(sim[i, j])) for j in idx]))
    return out


def plot_similarity(sim: np.ndarray, frame: Frame, path) -> None:
    """Heat map ordered by Z, with lines between periods."""
    import matplotlib.pyplot as plt

    n = frame.n
    fig, ax = plt.subplots(figsize=(13, 11.5))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(frame.symbols, rotation=90, fontsize=5.5)
    ax.set_yticklabels(frame.symbols, fontsize=5.5)
    periods = np.array([sites()[z - 1].period for z in frame.z])
    for b in np.flatnonzero(np.diff(periods)) + 0.5:
        ax.axhline(b, color="black", lw=0.5)
        ax.axvline(b, color="black", lw=0.5)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="cosine similarity")
    ax.set_title(f"{frame.name}: cosine similarity of {n} elements (ordered by Z; "
                 "lines separate periods)", fontsize=11)
    plotting.save(fig, path)


# --------------------------------------------------------------------------- agreement
def distances(frame: Frame) -> np.ndarray:
    """Cosine distance 1 − similarity in the frame's standardised space."""
    return 1.0 - cosine(frame.x)


def _ranks_upper(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import rankdata

    iu = np.triu_indices(len(d), 1)
    r = np.zeros_like(d)
    r[iu] = rankdata(d[iu])
    return r + r.T, iu


def _constant(d: np.ndarray) -> bool:
    # equal distances differ by rounding only; ranking that noise would fake a correlation
    v = d[np.triu_indices(len(d), 1)]
    return bool(np.ptp(v) <= 1e-9 * max(1.0, float(np.abs(v).max())))


@dataclass
class Agreement:
    rho: float        # Spearman correlation of the two distance matrices' upper triangles
    p: float          # one-sided permutation p-value (element labels of one table shuffled)
    n: int            # common elements
    permutations: int


def mantel(d1: np.ndarray, d2: np.ndarray, permutations: int = 999, seed: int = 0) -> Agreement:
    """Mantel test with Spearman's rho. ``rho`` is NaN when either matrix has constant distances
    (for example one-hot vectors, all equally far apart), where no ranking exists."""
    n = len(d1)
    if _constant(d1) or _constant(d2):
        return Agreement(float("nan"), float("nan"), n, 0)
    r1, iu = _ranks_upper(d1)
    r2, _ = _ranks_upper(d2)
    a = r1[iu]

    def corr(v):
        return float(np.corrcoef(a, v)[0, 1])

    rho = corr(r2[iu])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(n)
        hits += corr(r2[np.ix_(p, p)][iu]) >= rho
    return Agreement(rho, (hits + 1) / (permutations + 1), n, permutations)


def agreement_matrix(frames: list[Frame], permutations: int = 999, seed: int = 0):
    """Pairwise Mantel agreement of ``frames``, each pair on the elements both analyse
    (restandardised on that common set). Returns (rho, n) matrices and the pair results."""
    from uae_dist.analysis.frame import common_z

    m = len(frames)
    rho = np.eye(m)
    count = np.zeros((m, m), dtype=np.int64)
    pairs = {}
    for i in range(m):
        count[i, i] = frames[i].n
        for j in range(i + 1, m):
            zs = common_z([frames[i], frames[j]])
            if len(zs) < 4:
                res = Agreement(float("nan"), float("nan"), len(zs), 0)
            else:
                res = mantel(distances(frames[i].subset(zs)), distances(frames[j].subset(zs)),
                             permutations, seed)
            pairs[(i, j)] = res
            rho[i, j] = rho[j, i] = res.rho
            count[i, j] = count[j, i] = res.n
    return rho, count, pairs


def plot_agreement(rho: np.ndarray, count: np.ndarray, names, path) -> None:
    import matplotlib.pyplot as plt

    m = len(names)
    fig, ax = plt.subplots(figsize=(1.05 * m + 3, 0.9 * m + 2))
    shown = np.ma.masked_invalid(rho)
    im = ax.imshow(shown, cmap="viridis", vmin=min(0.0, np.nanmin(rho)), vmax=1)
    for i in range(m):
        for j in range(m):
            txt = "n/a" if not np.isfinite(rho[i, j]) else f"{rho[i, j]:.2f}"
            light = np.isfinite(rho[i, j]) and rho[i, j] < 0.6
            ax.text(j, i, f"{txt}\n(n={count[i, j]})", ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    ax.set_xticks(range(m))
    ax.set_yticks(range(m))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=9)
    ax.set_yticklabels(names, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="Spearman ρ of distance matrices")
    ax.set_title("Agreement between tables (cosine distances on common elements)", fontsize=11)
    plotting.save(fig, path)
