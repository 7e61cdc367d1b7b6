"""Training curves of a run directory as one PNG (train loss per target, validation MAE vs the mean
predictor), written at the end of every run: quicker to read than train.csv."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _read(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def plot_run(run_dir, path=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    tr = _read(run / "train.csv") if (run / "train.csv").exists() else {}
    va = _read(run / "val.csv") if (run / "val.csv").exists() else {}
    targets = [k[len("loss_"):] for k in tr if k.startswith("loss_")] or \
              [k[len("mae_"):] for k in va if k.startswith("mae_")]
    fig, axes = plt.subplots(1, 1 + len(targets), figsize=(4.4 * (1 + len(targets)), 3.4), squeeze=False)
    ax = axes[0]
    if tr:
        ax[0].plot(tr["step"], tr["loss"], label="total", color="k")
        for t in targets:
            ax[0].plot(tr["step"], tr[f"loss_{t}"], label=t, alpha=0.8)
        ax[0].set(xlabel="step", ylabel="training loss (normalised)", yscale="log", title="training loss")
        ax[0].legend(fontsize=8)
    for k, t in enumerate(targets, start=1):
        a = ax[k]
        if va and f"mae_{t}" in va:
            a.plot(va["step"], va[f"mae_{t}"], "o-", label="model")
            # the train-mean predictor does not change with the step: one line across the axis
            a.axhline(float(va[f"mean_predictor_mae_{t}"][-1]), ls="--", color="grey", label="mean predictor")
            a.set_ylim(bottom=0)
            a.legend(fontsize=8)
        a.set(xlabel="step", ylabel=f"validation MAE ({t})", title=t)
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    out = Path(path) if path else run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
