"""Figures of a matrix's results (PNG), one set per task.

``parity_<task>.png``  true vs predicted test values, one panel per backbone × featurizer, every
                       seed's predictions (``predictions_test.csv`` of each cell) in its own colour.
``curves_<task>.png``  per backbone: validation MAE (``val.csv``, physical units) and training
                       loss (``train.csv``, normalised) against the optimizer step, one colour per
                       featurizer, one line per seed.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _predictions(cell_dir: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    p = Path(cell_dir) / "predictions_test.csv"
    if not p.exists():
        return np.zeros(0), np.zeros(0)
    with open(p, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["target"] == target]
    return (np.array([float(r["true"]) for r in rows]),
            np.array([float(r["predicted"]) for r in rows]))


def _column(path: Path, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        return np.zeros(0), np.zeros(0)
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(y) not in (None, "")]
    return (np.array([float(r[x]) for r in rows]), np.array([float(r[y]) for r in rows]))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(name))


def parity_plots(rows: list[dict], cells: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    files = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        bbs = list(dict.fromkeys(r["backbone"] for r in rs))
        ncol = max(sum(r["backbone"] == b for r in rs) for b in bbs)
        fig, axes = plt.subplots(len(bbs), ncol, figsize=(3.2 * ncol, 3.2 * len(bbs)),
                                 squeeze=False)
        for i, b in enumerate(bbs):
            brs = [r for r in rs if r["backbone"] == b]
            for j in range(ncol):
                ax = axes[i][j]
                if j >= len(brs):
                    ax.axis("off")
                    continue
                r = brs[j]
                _parity_panel(ax, r, [c for c in cells if c["status"] == "done" and
                                      (c["task"], c["backbone"], c["featurizer"]) ==
                                      (task, b, r["featurizer"])])
        fig.suptitle(f"{task}: {rs[0]['target']} on {rs[0]['dataset']} (test)", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"parity_{_safe(task)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def _parity_panel(ax, r: dict, done: list[dict]) -> None:
    lo, hi = np.inf, -np.inf
    for c in sorted(done, key=lambda c: c["seed"]):
        y, p = _predictions(c["dir"], r["target"])
        if y.size:
            ax.scatter(y, p, s=8, alpha=0.6, label=f"seed {c['seed']}")
            lo, hi = min(lo, y.min(), p.min()), max(hi, y.max(), p.max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=6, loc="upper left")
    mae = "–" if r["mae_mean"] is None else f"{r['mae_mean']:.3g}"
    if r["mae_std"] is not None:
        mae += f" ± {r['mae_std']:.2g}"
    tag = " (default)" if r["is_default"] else ""
    ax.set_title(f"{r['backbone']} · {r['featurizer']}{tag}\nMAE {mae}", fontsize=8)
    u = f" ({r['units']})" if r["units"] else ""
    ax.set_xlabel(f"true{u}", fontsize=8)
    ax.set_ylabel(f"predicted{u}", fontsize=8)
    ax.tick_params(labelsize=7)


def learning_curves(rows: list[dict], cells: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    files = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        bbs = list(dict.fromkeys(r["backbone"] for r in rs))
        fig, axes = plt.subplots(2, len(bbs), figsize=(4.4 * len(bbs), 6.4), squeeze=False)
        for j, b in enumerate(bbs):
            fzs = [r["featurizer"] for r in rs if r["backbone"] == b]
            for k, fz in enumerate(fzs):
                color = f"C{k % 10}"
                mine = [c for c in cells if c["status"] == "done" and
                        (c["task"], c["backbone"], c["featurizer"]) == (task, b, fz)]
                for n, c in enumerate(sorted(mine, key=lambda c: c["seed"])):
                    label = fz if n == 0 else None
                    x, y = _column(Path(c["dir"]) / "val.csv", "step", f"mae_{rs[0]['target']}")
                    axes[0][j].plot(x, y, "o-", ms=3, lw=1, color=color, alpha=0.8, label=label)
                    x, y = _column(Path(c["dir"]) / "train.csv", "step", "loss")
                    axes[1][j].plot(x, y, lw=0.8, color=color, alpha=0.6, label=label)
            u = f" ({rs[0]['units']})" if rs[0]["units"] else ""
            axes[0][j].set(title=b, xlabel="step", ylabel=f"validation MAE{u}")
            axes[1][j].set(xlabel="step", ylabel="training loss (normalised)", yscale="log")
            for ax in axes[:, j]:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{task}: {rs[0]['target']} on {rs[0]['dataset']}", fontsize=10)
        fig.tight_layout()
        path = Path(out) / f"curves_{_safe(task)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files
