"""Reverse prediction: how well simple cross-validated regressors recover elemental properties
(periodic.PROPERTIES, from pymatgen) from each table's rows.

Every table is scored on the same elements (those analysed in all tables compared and known for
the property) and the same folds (``RepeatedKFold`` with one seed), so the scores are paired. The
features are standardised inside each fold (scaler fitted on the training part only). R² is taken
per test fold; the report gives its mean and standard deviation over folds. A table that carries
no information scores about 0 or below (a fold's own mean is not available to the model).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uae_dist.analysis import plotting
from uae_dist.analysis.frame import Frame, common_z, single_threaded
from uae_dist.analysis.periodic import PROPERTIES, Property, property_by_attr, property_table

MODELS = ("ridge", "knn", "gbm")


def make_model(name: str, seed: int):
    """A fresh scikit-learn regressor: ``ridge`` (alpha by efficient leave-one-out over 1e-3..1e4),
    ``knn`` (5 neighbours, distance-weighted) or ``gbm`` (gradient boosting, 200 depth-2 trees)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "ridge":
        from sklearn.linear_model import RidgeCV

        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    if name == "knn":
        from sklearn.neighbors import KNeighborsRegressor

        return make_pipeline(StandardScaler(), KNeighborsRegressor(5, weights="distance"))
    if name == "gbm":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(n_estimators=200, max_depth=2, learning_rate=0.05,
                                         subsample=0.8, random_state=seed)
    raise ValueError(f"unknown reverse-prediction model {name!r}; choose from {', '.join(MODELS)}")


@dataclass
class Score:
    table: str
    prop: str
    model: str
    r2: np.ndarray  # one R² per test fold
    n: int          # elements scored

    @property
    def mean(self) -> float:
        return float(self.r2.mean())

    @property
    def std(self) -> float:
        return float(self.r2.std())


@single_threaded
def reverse_predict(frames: list[Frame], models=("ridge", "knn"), folds: int = 5,
                    repeats: int = 3, seed: int = 0,
                    props: tuple[Property, ...] = PROPERTIES) -> list[Score]:
    """Scores of every frame × property × model (see the module docstring)."""
    from sklearn.base import clone
    from sklearn.metrics import r2_score
    from sklearn.model_selection import RepeatedKFold

    for m in models:
        make_model(m, seed)  # unknown names fail before any work
    zs = common_z(frames)
    table = property_table()
    out = []
    for prop in props:
        y_all = table[prop.attr][zs - 1]
        z = zs[np.isfinite(y_all)]
        y = y_all[np.isfinite(y_all)]
        if len(z) < 2 * folds:
            raise ValueError(f"reverse prediction of {prop.attr}: only {len(z)} common elements "
                             f"have a value; need at least {2 * folds} for {folds} folds")
        splits = list(RepeatedKFold(n_splits=folds, n_repeats=repeats,
                                    random_state=seed).split(z))
        for f in frames:
            x = f.raw[np.searchsorted(f.z, z)]
            for m in models:
                proto = make_model(m, seed)
                r2 = []
                for tr, te in splits:
                    est = clone(proto).fit(x[tr], y[tr])
                    r2.append(r2_score(y[te], est.predict(x[te])))
                out.append(Score(f.name, prop.attr, m, np.array(r2), len(z)))
    return out


def plot_scores(scores: list[Score], names, models, path, floor: float = -0.5) -> None:
    """Grouped bars (one group per property, one bar per table) with ±std over folds, one panel
    per model; bars below ``floor`` are cut there and marked with their value."""
    import matplotlib.pyplot as plt

    props = list(dict.fromkeys(s.prop for s in scores))
    by = {(s.table, s.prop, s.model): s for s in scores}
    cols = plotting.category_colours(len(names))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(len(models), 1, figsize=(max(12, 1.6 * len(props)), 4.2 * len(models)),
                             squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        for t, name in enumerate(names):
            xs = np.arange(len(props)) + (t - (len(names) - 1) / 2) * width
            mean = np.array([by[(name, p, m)].mean for p in props])
            std = np.array([by[(name, p, m)].std for p in props])
            shown = mean > floor  # error bars stop at the panel's edges
            err = [np.where(shown, np.clip(std, 0, mean - floor), 0),
                   np.where(shown, np.clip(std, 0, 1.0 - mean), 0)]
            ax.bar(xs, np.maximum(mean, floor), width, yerr=err, color=cols[t], label=name,
                   capsize=1.5, error_kw=dict(lw=0.6))
            for x, v in zip(xs, mean):
                if v < floor:
                    ax.text(x, floor + 0.02, f"{v:.1f}", rotation=90, ha="center", va="bottom",
                            fontsize=6)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylim(floor, 1.0)
        ax.set_ylabel("R² (mean ± std over folds)")
        ax.set_title(f"reverse prediction with {m}", fontsize=11)
        ax.set_xticks(range(len(props)))
        ax.set_xticklabels([property_by_attr(p).label for p in props], rotation=20, ha="right",
                           fontsize=8)
        ax.grid(axis="y", lw=0.3)
    axes[0, 0].legend(ncol=min(len(names), 7), fontsize=8, loc="lower left",
                      bbox_to_anchor=(0, 1.08), frameon=False)
    fig.tight_layout()
    plotting.save(fig, path)
