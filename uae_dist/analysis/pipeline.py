"""``analyze(spec, out_dir, ...)``: every analysis of one table, written to one directory.

Outputs (all in ``out_dir``; files of these names are overwritten, other files are left alone):

    maps_umap.png, maps_pca.png   2-D maps coloured by group, period and block
    maps.csv                      the coordinates (PCA, UMAP of the first seed)
    clusters_scan.png             SSE and silhouette against k, the map in its clusters
    clusters_periodic.png         periodic table coloured by cluster
    clusters.csv                  each element's cluster (first seed, chosen k)
    similarity.png, similarity.csv, nearest.csv
    reverse_r2.png, reverse_r2.csv, reverse_folds.csv
    agreement.png, agreement.csv
    summary.json                  every number of the report
    report.md, report.html
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from uae_dist.analysis import clusters, maps, reverse, similarity
from uae_dist.analysis.frame import Frame, common_z, frame_of, single_threaded
from uae_dist.analysis.summary import build_report

log = logging.getLogger(__name__)

DEFAULT_COMPARE = ("cgcnn92", "megnet16", "magpie", "mat2vec", "onehot", "random")


def parse_compare(text: str | None) -> list[str]:
    """``a,b,c`` → names; empty or ``none`` → no comparison."""
    if text is None:
        return list(DEFAULT_COMPARE)
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [] if items in ([], ["none"]) else items


def load_frames(spec, compare) -> tuple[Frame, list[Frame]]:
    """The analysed table and the compared ones (duplicates of the analysed name dropped); every
    table is loaded before any work so a bad name fails at once."""
    from uae_dist.tables import load_table

    main = frame_of(load_table(spec))
    others, seen = [], {main.name}
    for c in compare:
        f = frame_of(load_table(c))
        if f.name in seen:
            log.info("analyze: %s is already in the analysis; compared once", f.name)
            continue
        seen.add(f.name)
        others.append(f)
    return main, others


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@single_threaded
def analyze(spec, out_dir, compare=DEFAULT_COMPARE, seeds: int = 5, k_max: int = 10,
            models=("ridge", "knn"), folds: int = 5, repeats: int = 3, seed: int = 0,
            permutations: int = 999, command: str | None = None) -> dict:
    """Run every analysis of the table ``spec`` (see uae_dist.tables.load_table) against the
    tables in ``compare`` and write the files listed in the module docstring. Seeds are
    ``seed .. seed + seeds - 1`` for UMAP and k-means; ``seed`` alone for folds and permutations.
    Returns the summary also written to ``summary.json``."""
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    main, others = load_frames(spec, list(compare))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_list = list(range(seed, seed + seeds))

    log.info("analyze %s: %d elements, %d-d; maps and clusters", main.name, main.n,
             main.raw.shape[1])
    pca_xy, pca_var = maps.pca_map(main.x)
    scan = clusters.scan(main.x, range(2, k_max + 1), seed_list)
    umap_xy = scan.maps[0]
    maps.plot_maps(umap_xy, main, "UMAP", out / "maps_umap.png", f" (seed {seed_list[0]})")
    maps.plot_maps(pca_xy, main, "PCA", out / "maps_pca.png",
                   f" (PC1 {pca_var[0]:.0%}, PC2 {pca_var[1]:.0%} of the variance)")
    _write_csv(out / "maps.csv", ["element", "Z", "pca1", "pca2", "umap1", "umap2"],
               [[s, int(z), *map(float, p), *map(float, u)]
                for s, z, p, u in zip(main.symbols, main.z, pca_xy, umap_xy)])
    null = clusters.null_scan(main.n, main.raw.shape[1], scan.ks, seed_list, seed)
    clusters.plot_scan(scan, main, out / "clusters_scan.png", null)
    clusters.plot_periodic(scan, main, out / "clusters_periodic.png")
    lab = scan.ordered_labels(0)
    _write_csv(out / "clusters.csv", ["element", "Z", "cluster"],
               [[s, int(z), int(c)] for s, z, c in zip(main.symbols, main.z, lab)])

    log.info("analyze: similarity")
    sim = similarity.cosine(main.x)
    similarity.plot_similarity(sim, main, out / "similarity.png")
    _write_csv(out / "similarity.csv", ["element", *main.symbols],
               [[s, *(f"{v:.6f}" for v in row)] for s, row in zip(main.symbols, sim)])
    near = similarity.nearest(sim, main.symbols, 5)
    _write_csv(out / "nearest.csv", ["element"] + [f"{w}{i}" for i in range(1, 6)
                                                     for w in ("nearest", "similarity")],
               [[s] + [v for sym, c in nn for v in (sym, f"{c:.4f}")] for s, nn in near])

    frames = [main] + others
    names = [f.name for f in frames]
    log.info("analyze: reverse prediction on %d tables", len(frames))
    scores = reverse.reverse_predict(frames, models, folds, repeats, seed)
    reverse.plot_scores(scores, names, list(models), out / "reverse_r2.png")
    _write_csv(out / "reverse_r2.csv", ["table", "property", "model", "r2_mean", "r2_std",
                                        "folds", "elements"],
               [[s.table, s.prop, s.model, f"{s.mean:.4f}", f"{s.std:.4f}", len(s.r2), s.n]
                for s in scores])
    _write_csv(out / "reverse_folds.csv", ["table", "property", "model", "fold", "r2"],
               [[s.table, s.prop, s.model, i, f"{v:.6f}"] for s in scores
                for i, v in enumerate(s.r2)])

    log.info("analyze: agreement of distance matrices")
    rho, count, pairs = similarity.agreement_matrix(frames, permutations, seed)
    if len(frames) > 1:
        similarity.plot_agreement(rho, count, names, out / "agreement.png")
    else:  # an earlier run's figure must not pass for this one's
        (out / "agreement.png").unlink(missing_ok=True)
    _write_csv(out / "agreement.csv", ["table_a", "table_b", "spearman_rho", "p_value",
                                       "common_elements", "permutations"],
               [[names[i], names[j], f"{a.rho:.4f}", f"{a.p:.4f}", a.n, a.permutations]
                for (i, j), a in pairs.items()])

    summary = {
        "table": main.name, "dim": int(main.raw.shape[1]), "elements": main.symbols,
        "untrained": main.untrained, "absent": main.absent, "duplicates": main.duplicates,
        "compared": {f.name: {"elements": f.n, "dim": int(f.raw.shape[1]),
                              "left_out": f.untrained + f.absent} for f in others},
        "reverse_elements": [int(z) for z in common_z(frames)],
        "settings": {"seeds": seed_list, "k_range": scan.ks, "models": list(models),
                     "folds": folds, "repeats": repeats, "seed": seed,
                     "permutations": permutations, "umap_n_neighbors": maps.UMAP_NEIGHBOURS,
                     "umap_min_dist": maps.UMAP_MIN_DIST},
        "pca_explained_variance": [float(v) for v in pca_var],
        "clusters": {"k": scan.k, "k_elbow": scan.k_elbow, "k_silhouette": scan.k_silhouette,
                     "silhouette_mean": scan.silhouette_at_k[0],
                     "silhouette_std": scan.silhouette_at_k[1], "stability_ari": scan.stability,
                     "sse": scan.sse.tolist(), "silhouette": scan.silhouette.tolist(),
                     "null": {"k": null.k, "silhouette_mean": null.silhouette_at_k[0],
                              "silhouette_std": null.silhouette_at_k[1],
                              "silhouette": null.silhouette.tolist()},
                     "labels_seed0": {s: int(c) for s, c in zip(main.symbols, lab)}},
        "nearest": {s: nn for s, nn in near},
        "reverse": [{"table": s.table, "property": s.prop, "model": s.model, "r2_mean": s.mean,
                     "r2_std": s.std, "r2_folds": s.r2.tolist(), "elements": s.n}
                    for s in scores],
        "agreement": [{"a": names[i], "b": names[j], "rho": a.rho, "p": a.p, "n": a.n}
                      for (i, j), a in pairs.items()],
        "command": command,
        "card": main.card,
    }
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=1, allow_nan=False))
    build_report(summary, frames, out).write(out)
    log.info("analyze: report → %s", out / "report.html")
    return summary


def _plain(o):
    """JSON-ready copy: numpy scalars and arrays as Python values, NaN as null."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o
