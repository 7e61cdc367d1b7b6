"""k-means on the UMAP map, as in the paper (k = 3 from the elbow and silhouette over 5 seeds).

For each seed s the UMAP map is recomputed with ``random_state = s`` and k-means
(``random_state = s``, 10 restarts) is fitted on it for every k in the scan, so the spread over
seeds covers both the map and the clustering. Both criteria choose k: the elbow of the mean SSE
curve (the point farthest below the chord joining its ends, the "kneedle" rule) bounds how many
clusters are worth having, and among k = 2 … elbow the highest mean silhouette wins. Silhouette
alone tends to climb with k on a UMAP map, whose fine clumps keep separating, so its own maximum
(``k_silhouette``) is reported but not used. Stability is the mean adjusted Rand index between the
seeds' clusterings at the chosen k (1 = every seed finds the same partition).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from uae_dist.analysis import plotting
from uae_dist.analysis.frame import Frame, single_threaded
from uae_dist.analysis.maps import umap_map


@dataclass
class Scan:
    ks: list[int]
    seeds: list[int]
    sse: np.ndarray          # (seeds, ks)
    silhouette: np.ndarray   # (seeds, ks)
    labels: np.ndarray       # (seeds, ks, n) cluster of each element
    maps: np.ndarray         # (seeds, n, 2) the UMAP map of each seed
    k: int                   # chosen: best mean silhouette among k <= k_elbow
    k_elbow: int             # elbow of the mean SSE curve
    k_silhouette: int        # best mean silhouette over the whole scan

    def at(self, k: int | None = None) -> int:
        return self.ks.index(self.k if k is None else k)

    @property
    def silhouette_at_k(self) -> tuple[float, float]:
        """Mean and standard deviation over seeds of the silhouette at the chosen k."""
        s = self.silhouette[:, self.at()]
        return float(s.mean()), float(s.std())

    @property
    def stability(self) -> float:
        """Mean pairwise adjusted Rand index of the seeds' partitions at the chosen k."""
        from sklearn.metrics import adjusted_rand_score

        lab = self.labels[:, self.at()]
        pairs = list(combinations(range(len(self.seeds)), 2))
        if not pairs:
            return float("nan")
        return float(np.mean([adjusted_rand_score(lab[a], lab[b]) for a, b in pairs]))

    def ordered_labels(self, seed_index: int = 0) -> np.ndarray:
        """Clusters of one seed at the chosen k, renumbered 1.. in order of their lowest Z so the
        numbering does not depend on k-means' arbitrary label order."""
        lab = self.labels[seed_index, self.at()]
        order = {c: i + 1 for i, c in enumerate(dict.fromkeys(lab.tolist()))}
        return np.array([order[c] for c in lab])


def elbow(ks, sse) -> int:
    """The k whose point lies farthest below the straight line from the first to the last point
    of the (k, SSE) curve, both axes scaled to [0, 1]."""
    ks = np.asarray(ks, dtype=float)
    y = np.asarray(sse, dtype=float)
    if len(ks) < 3:
        return int(ks[0])
    xs = (ks - ks[0]) / (ks[-1] - ks[0])
    span = y[0] - y[-1]
    ys = (y - y[-1]) / span if span > 0 else np.zeros_like(y)
    gap = (1.0 - xs) - ys  # the chord runs from (0, 1) to (1, 0)
    return int(ks[int(np.argmax(gap))])


@single_threaded
def scan(x: np.ndarray, ks=range(2, 11), seeds=range(5), maps: np.ndarray | None = None) -> Scan:
    """Fit k-means for every k and seed (see the module docstring). ``maps`` (seeds, n, 2) may be
    given to reuse UMAP maps already computed for these seeds."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(x)
    ks = [int(k) for k in ks if 2 <= k <= n - 1]
    seeds = [int(s) for s in seeds]
    if not ks or not seeds:
        raise ValueError(f"no k in the scan fits {n} elements (need 2 <= k <= n - 1) or no seeds")
    if maps is None:
        maps = np.stack([umap_map(x, s) for s in seeds])
    sse = np.zeros((len(seeds), len(ks)))
    sil = np.zeros_like(sse)
    labels = np.zeros((len(seeds), len(ks), n), dtype=np.int64)
    for i, s in enumerate(seeds):
        for j, k in enumerate(ks):
            km = KMeans(n_clusters=k, n_init=10, random_state=s).fit(maps[i])
            sse[i, j] = km.inertia_
            labels[i, j] = km.labels_
            # coincident map points can leave fewer distinct clusters than k
            sil[i, j] = (silhouette_score(maps[i], km.labels_)
                         if len(set(km.labels_)) > 1 else np.nan)
    # a k at which every seed's map collapsed has no silhouette; it can never be chosen
    mean_sil = np.array([np.nanmean(c) if np.isfinite(c).any() else -np.inf for c in sil.T])
    k_elbow = elbow(ks, sse.mean(0))
    upto = [j for j, k in enumerate(ks) if k <= k_elbow]
    k = ks[upto[int(np.argmax(mean_sil[upto]))]]
    return Scan(ks, seeds, sse, sil, labels, maps, k, k_elbow, ks[int(np.argmax(mean_sil))])


def null_scan(n: int, dim: int, ks, seeds, seed: int = 0) -> Scan:
    """The same scan on a standard-normal table of ``n`` rows and ``dim`` columns: UMAP draws
    clumps even in noise, so this is the silhouette a table without structure gets."""
    from uae_dist.analysis.frame import standardise

    return scan(standardise(np.random.default_rng(seed).standard_normal((n, dim))), ks, seeds)


def plot_scan(sc: Scan, frame: Frame, path, null: Scan | None = None) -> None:
    """SSE and silhouette against k (mean ± std over seeds) and the seed-0 map in its clusters;
    ``null`` adds the silhouette of a random table of the same shape."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 6), gridspec_kw=dict(width_ratios=[1, 1, 1.6]))
    for ax, arr, what in ((axes[0], sc.sse, "SSE (within-cluster sum of squares)"),
                          (axes[1], sc.silhouette, "silhouette")):
        m, s = np.nanmean(arr, 0), np.nanstd(arr, 0)
        ax.errorbar(sc.ks, m, yerr=s, marker="o", capsize=3, color="#1f77b4")
        for i in range(len(sc.seeds)):
            ax.plot(sc.ks, arr[i], color="0.75", lw=0.7, zorder=0)
        if null is not None and arr is sc.silhouette:
            nm, ns = np.nanmean(null.silhouette, 0), np.nanstd(null.silhouette, 0)
            ax.errorbar(null.ks, nm, yerr=ns, marker="s", ms=4, capsize=2, color="0.35",
                        ls="--", lw=1, label="random table, same shape")
        ax.axvline(sc.k, color="#d62728", ls="--", lw=1, label=f"chosen k = {sc.k}")
        ax.axvline(sc.k_elbow, color="#2ca02c", ls=":", lw=1.5, label=f"elbow k = {sc.k_elbow}")
        ax.set_xlabel("k")
        ax.set_ylabel(what)
        ax.set_xticks(sc.ks)
        ax.legend(fontsize=8)
        ax.set_title(f"{what.split(' (')[0]}: mean ± std over {len(sc.seeds)} seeds "
                     "(grey: each seed)", fontsize=10)
    lab = sc.ordered_labels(0)
    cols = plotting.category_colours(int(lab.max()))
    plotting.labelled_scatter(axes[2], sc.maps[0], frame.symbols, [cols[c - 1] for c in lab],
                              f"UMAP (seed {sc.seeds[0]}) in its k = {sc.k} clusters")
    from matplotlib.patches import Patch

    axes[2].legend(handles=[Patch(color=cols[c], label=f"cluster {c + 1}")
                            for c in range(int(lab.max()))], fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{frame.name}: k-means on the UMAP map", fontsize=13)
    plotting.save(fig, path)


def plot_periodic(sc: Scan, frame: Frame, path) -> None:
    """Periodic table with each analysed element coloured by its seed-0 cluster at the chosen k."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lab = sc.ordered_labels(0)
    cols = plotting.category_colours(int(lab.max()))
    colour_of = {int(z): cols[c - 1] for z, c in zip(frame.z, lab)}
    text_of = {int(z): str(c) for z, c in zip(frame.z, lab)}
    excluded = {s: "untrained" for s in frame.untrained} | {s: "absent" for s in frame.absent}
    fig, ax = plt.subplots(figsize=(14, 8))
    plotting.periodic_heatmap(ax, colour_of, text_of, f"{frame.name}: k-means clusters "
                              f"(k = {sc.k}, UMAP seed {sc.seeds[0]})", excluded)
    handles = [Patch(color=cols[c], label=f"cluster {c + 1}") for c in range(int(lab.max()))]
    handles.append(Patch(facecolor=plotting.MISSING_COLOUR, hatch="///", edgecolor="0.3",
                         label="left out (untrained / absent)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=6,
              fontsize=9, frameon=False)
    plotting.save(fig, path)
