"""2-D maps of the elements: PCA (linear, deterministic) and UMAP (non-linear, seeded), drawn
three times, coloured by group, period and block, each point labelled with its symbol."""
from __future__ import annotations

import warnings

import numpy as np

from uae_dist.analysis import plotting
from uae_dist.analysis.frame import Frame
from uae_dist.analysis.periodic import sites

UMAP_NEIGHBOURS = 15
UMAP_MIN_DIST = 0.1


def pca_map(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) coordinates on the first two principal components of ``x`` and the fraction of
    variance each explains. The sign of each axis is fixed (largest loading positive) so the
    picture does not flip between library versions."""
    from sklearn.decomposition import PCA

    p = PCA(n_components=2, svd_solver="full").fit(x)
    sign = np.sign(p.components_[np.arange(2), np.abs(p.components_).argmax(1)])
    return p.transform(x) * sign, p.explained_variance_ratio_


def umap_map(x: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) UMAP coordinates of ``x`` (Euclidean on the standardised features); fixing
    ``random_state`` makes umap-learn single-threaded and exactly reproducible."""
    import umap

    n_neighbors = min(UMAP_NEIGHBOURS, len(x) - 1)
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": that is the point
        warnings.simplefilter("ignore", UserWarning)
        model = umap.UMAP(n_neighbors=n_neighbors, min_dist=UMAP_MIN_DIST, n_components=2,
                          random_state=seed, init="spectral" if len(x) > 20 else "random")
        return np.asarray(model.fit_transform(x), dtype=np.float64)


def colours_by(frame: Frame, attr: str) -> tuple[list, set]:
    _, cmap = plotting.COLOURINGS[attr]
    values = [getattr(sites()[z - 1], attr) for z in frame.z]
    return [cmap[v] for v in values], set(values)


def plot_maps(xy: np.ndarray, frame: Frame, method: str, path, subtitle: str = "") -> None:
    """One PNG with three panels of the same map coloured by group, period and block, stacked so
    that each is shown at the full width of the report and its labels stay legible."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10.5, 26), gridspec_kw=dict(hspace=0.12))
    labels = None  # the three panels have one size: place the labels once, reuse them
    for ax, attr in zip(axes, ("group", "period", "block")):
        colours, present = colours_by(frame, attr)
        labels = plotting.labelled_scatter(ax, xy, frame.symbols, colours, f"{method}: by {attr}",
                                           labels)
        order, cmap = plotting.COLOURINGS[attr]
        plotting.legend_for(ax, order, cmap, present, attr, ncol=2 if attr == "group" else 1)
    fig.subplots_adjust(top=0.94)
    fig.suptitle(f"{frame.name}: {method} of {frame.n} elements{subtitle}", fontsize=13, y=0.962)
    plotting.save(fig, path)
