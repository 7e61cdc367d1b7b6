"""The report's text: turns the numbers of pipeline.analyze into a Report (report.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from uae_dist.analysis.periodic import property_by_attr
from uae_dist.analysis.report import Report
from uae_dist.elements import SYMBOLS

# model-card fields shown in the summary table; the full card follows in a collapsible block
CARD_FIELDS = ("name", "table_name", "source", "uae_dist_version", "created", "checkpoint",
               "checkpoint_step", "model", "targets", "validation", "test", "data")


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _pm(mean, std, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _card_value(v) -> str:
    if isinstance(v, (dict, list)):
        text = json.dumps(v, separators=(", ", ": "))
        return text if len(text) <= 300 else text[:297] + "…"
    return str(v)


def _elements(symbols) -> str:
    return ", ".join(symbols) if symbols else "none"


def _overview(r: Report, s: dict, frames) -> None:
    main = frames[0]
    r.heading("Overview")
    r.bullets([
        f"table: `{s['table']}`, {s['dim']} dimensions",
        f"analysed: {main.n} elements ({main.symbols[0]} … {main.symbols[-1]})",
        f"left out, untrained (row holds no learned information): {len(s['untrained'])} — "
        f"{_elements(s['untrained'])}",
        f"left out, absent from the table: {len(s['absent'])} — {_elements(s['absent'])}",
    ])
    if s["duplicates"]:
        groups = "; ".join(", ".join(g) for g in s["duplicates"])
        r.text(f"Elements with identical rows, which this table cannot tell apart (kept; "
               f"untrained placeholders a table does not mark would look like this): {groups}.",
               note=True)
    r.text("Left-out rows enter no statistic: not the maps, the clusters, the similarities, the "
           "reverse prediction or the agreement.")
    if s["compared"]:
        rows = [[name, c["dim"], c["elements"], _elements(c["left_out"])]
                for name, c in s["compared"].items()]
        r.table(["compared table", "dim", "elements analysed", "left out"], rows)


def _glance(r: Report, s: dict) -> None:
    """The headline numbers, computed from the results (nothing here is fixed text)."""
    c = s["clusters"]
    names = [s["table"]] + list(s["compared"])
    items = [f"clusters: k = {c['k']} (elbow {c['k_elbow']}), silhouette "
             f"{_pm(c['silhouette_mean'], c['silhouette_std'])} over {len(s['settings']['seeds'])}"
             f" seeds, stability (ARI) {_fmt(c['stability_ari'])}; a random table of the same "
             f"shape: {_pm(c['null']['silhouette_mean'], c['null']['silhouette_std'])}"]
    for m in s["settings"]["models"]:
        means = {t: _mean_r2(s, t, m) for t in names}
        best = max(names, key=lambda t: means[t])
        items.append(f"reverse prediction ({m}), mean R² over properties: "
                     + ", ".join(f"{t} {_fmt(means[t])}" for t in names) + f"; best: {best}")
    agree = [a for a in s["agreement"] if a["a"] == s["table"]]
    if agree:
        items.append("agreement (Spearman ρ of distance matrices) with "
                     + ", ".join(f"{a['b']} {_fmt(a['rho'])}" for a in agree))
    r.heading("At a glance")
    r.bullets(items)


def _mean_r2(s: dict, table: str, model: str) -> float:
    v = [x["r2_mean"] for x in s["reverse"] if x["table"] == table and x["model"] == model]
    return sum(v) / len(v) if v else float("nan")


def _card(r: Report, card: dict) -> None:
    r.heading("Model card")
    if not card:
        r.text("This table carries no model card.")
        return
    rows = [[k, _card_value(card[k])] for k in CARD_FIELDS
            if k in card and not (k in ("validation", "test") and _metrics(card))]
    if rows:
        r.table(["field", "value"], rows)
    if _metrics(card):
        r.table(["target", "val MAE", "val R²", "test MAE", "test R²", "mean-predictor MAE"],
                _metrics(card), caption="the pretraining model's own validation and test scores")
    full = Report("")
    full.code(json.dumps(card, indent=1))
    r.details("full model card (JSON)", full)


def _metrics(card: dict) -> list[list[str]]:
    """Rows of the pretraining metrics in a uae-dist model card, if it has them."""
    val = ((card.get("validation") or {}).get("metrics")) or {}
    test = ((card.get("test") or {}).get("targets")) or {}
    rows = []
    for t in dict.fromkeys(list(val) + list(test)):
        v, te = val.get(t, {}), test.get(t, {})
        rows.append([t, _fmt(v.get("mae"), 4), _fmt(v.get("r2"), 3), _fmt(te.get("mae"), 4),
                     _fmt(te.get("r2"), 3),
                     _fmt(te.get("mean_predictor_mae", v.get("mean_predictor_mae")), 4)])
    return rows


def _maps(r: Report, s: dict, out: Path) -> None:
    r.heading("Maps")
    v = s["pca_explained_variance"]
    r.text(f"Each point is an element, placed by UMAP (non-linear, neighbourhoods kept; seed "
           f"{s['settings']['seeds'][0]}, {s['settings']['umap_n_neighbors']} neighbours) or by "
           f"PCA (the two directions of largest variance: {v[0]:.0%} and {v[1]:.0%}). Elements "
           "close together have similar rows. Colours mark group (lanthanides Ln and actinides "
           "An apart), period and block; a table that learned chemistry shows them as runs.")
    r.figure(out / "maps_umap.png", "UMAP coloured by group, period and block")
    r.figure(out / "maps_pca.png", "PCA coloured by group, period and block")


def _clusters(r: Report, s: dict, out: Path) -> None:
    c = s["clusters"]
    st = s["settings"]
    r.heading("Clusters")
    r.text(f"k-means on the UMAP map for k = {st['k_range'][0]}…{st['k_range'][-1]}, over "
           f"{len(st['seeds'])} seeds (UMAP and k-means both reseeded). The elbow of the SSE "
           f"curve, **{c['k_elbow']}**, bounds the number of clusters; among k = 2…"
           f"{c['k_elbow']} the best mean silhouette gives the chosen k = **{c['k']}** "
           f"(silhouette alone would pick {c['k_silhouette']}; on a UMAP map it tends to climb "
           f"with k as the map's fine clumps separate). Silhouette "
           f"at k = {c['k']}: **{_pm(c['silhouette_mean'], c['silhouette_std'])}** (mean ± std "
           f"over seeds; 1 = tight, well-separated clusters, 0 = none). Stability (mean adjusted "
           f"Rand index between the seeds' partitions): {_fmt(c['stability_ari'])}. Baseline: the "
           f"same scan on a standard-normal table of the same shape (UMAP finds clumps even in "
           f"noise) picks k = {c['null']['k']} with silhouette "
           f"{_pm(c['null']['silhouette_mean'], c['null']['silhouette_std'])}; only a silhouette "
           "clearly above that says the clusters are more than the map's own grain.")
    r.figure(out / "clusters_scan.png", "elbow (SSE) and silhouette against k; the map in its "
             "clusters")
    r.figure(out / "clusters_periodic.png", "clusters on the periodic table (grey hatched: left "
             "out)")
    members: dict[int, list[str]] = {}
    for sym, k in c["labels_seed0"].items():
        members.setdefault(k, []).append(sym)
    r.table(["cluster", "elements"], [[k, ", ".join(v)] for k, v in sorted(members.items())])


def _similarity(r: Report, s: dict, out: Path) -> None:
    r.heading("Similarity")
    r.text("Cosine similarity of the standardised rows (each column z-scored over the analysed "
           "elements, so a shared offset does not make every pair look alike).")
    r.figure(out / "similarity.png", "cosine similarity, elements ordered by Z")
    inner = Report("")
    inner.table(["element", "nearest five (cosine similarity)"],
                [[e, ", ".join(f"{n} ({v:.2f})" for n, v in nn)] for e, nn in s["nearest"].items()])
    r.details("each element's nearest elements", inner)


def _reverse(r: Report, s: dict, out: Path) -> None:
    st = s["settings"]
    r.heading("Reverse prediction")
    zs = s["reverse_elements"]
    r.text(f"Can simple models recover elemental properties (pymatgen's element data) from a "
           f"table's rows? {st['folds']}-fold cross-validation repeated {st['repeats']} times "
           f"(seed {st['seed']}), the same folds for every table, on the {len(zs)} elements "
           f"analysed in every table and known for the property. Models: "
           f"{', '.join(st['models'])} (features standardised inside each fold). Cells: R² mean "
           "± std over the folds; 0 is no better than guessing the mean.")
    names = [s["table"]] + list(s["compared"])
    by = {(x["table"], x["property"], x["model"]): x for x in s["reverse"]}
    props = list(dict.fromkeys(x["property"] for x in s["reverse"]))
    for m in st["models"]:
        rows = []
        for p in props:
            n = by[(names[0], p, m)]["elements"]
            rows.append([property_by_attr(p).label, n]
                        + [_pm(by[(t, p, m)]["r2_mean"], by[(t, p, m)]["r2_std"]) for t in names])
        rows.append(["**mean over properties**", ""] + [_fmt(_mean_r2(s, t, m)) for t in names])
        r.table(["property", "n"] + names, rows, caption=f"R² with {m}")
    r.figure(out / "reverse_r2.png", "R² per property and table (bars below the "
             "axis floor are cut and labelled with their value)")
    left = sorted(set(s["elements"]) - {SYMBOLS[z - 1] for z in zs},
                  key=lambda e: SYMBOLS.index(e))
    if left:
        r.text(f"Analysed here but left out of reverse prediction because a compared table "
               f"lacks them: {', '.join(left)}.")


def _agreement(r: Report, s: dict, out: Path) -> None:
    r.heading("Agreement with other tables")
    if not s["agreement"]:
        r.text("No tables compared.")
        return
    r.text("Do two tables agree on which elements are alike? For each pair, on the elements "
           "both analyse: Spearman's ρ between their element–element cosine distances (upper "
           "triangles), with a one-sided Mantel permutation p-value. n/a: one table's distances "
           "are all equal (one-hot vectors), so there is nothing to rank.")
    rows = [[a["b"], a["n"], _fmt(a["rho"]), _fmt(a["p"], 3)]
            for a in s["agreement"] if a["a"] == s["table"]]
    r.table(["compared with", "common elements", "Spearman ρ", "p"], rows,
            caption=f"{s['table']} against each compared table")
    r.figure(out / "agreement.png", "Spearman ρ for every pair of tables")


def build_report(summary: dict, frames, out: Path) -> Report:
    s = summary
    r = Report(f"Embedding analysis: {summary['table']}")
    _overview(r, s, frames)
    _glance(r, s)
    _card(r, summary["card"])
    _maps(r, s, out)
    _clusters(r, s, out)
    _similarity(r, s, out)
    _reverse(r, s, out)
    _agreement(r, s, out)
    r.heading("Reproduce")
    r.code(summary.get("command") or f"uae-dist analyze {summary['table']} --out {out}")
    r.text("Every number is also in `summary.json` and the CSV files beside this report.")
    return r
